"""The BayesDiff test (issue 18, Build 5): each generated image scored by its own excess variance along the
sampling trajectory (uncertainty.ExcessVarianceScore, T8), the most uncertain dropped, the rest compared with
random subsets of the same size (experiments/filtering.py, `gendiff eval RUN --filter F`).

Breakages tried (each seen to fail here, then restored):
- the clamp at 0 removed (`.clamp_min(0)` dropped): test_score_is_the_closed_form_excess_over_the_grid[diag]
- σ instead of σ² subtracted (wrong power): test_score_is_the_closed_form_excess_over_the_grid (both heads)
- the σ range ignored (every step recorded): test_score_is_the_closed_form_excess_over_the_grid
- every evaluation counted (Heun's corrector at the Euler-predicted point kept beside the trajectory point,
  keyed by (σ, call) instead of σ): test_score_is_the_mean_over_the_trajectory_points by value (the
  closed-form test sees it only through its count of steps: with a constant G both points give one value)
- forward() evaluating the network twice (denoiser(x) and then predict): test_scoring_costs_no_network_
  evaluation
- the per-batch scores joined in reverse batch order: test_scores_do_not_depend_on_the_batch_split
- keep_most_certain keeping the highest scores: test_the_kept_set_is_exactly_the_lowest_scores
- random_subsets from the global generator (torch.randperm without generator=): test_random_subsets_are_
  seeded_and_of_equal_size; subsets of k + 1: the same test
- the gain's sign not flipped for FID (lower is better): test_comparison_with_random_subsets
- the has_confidence check removed: test_refusals (the no-head run then fails later with another error)
- sample_images not applying `wrap` (the recorder built but bypassed): test_scores_do_not_depend_on_the_batch_
  split (no step recorded)
- beats_random as gain > 0 instead of gain > sd: test_comparison_with_random_subsets
- the random subsets' metrics taken from the kept set (`x[kept]` for every subset): the CLI test (the
  random values all equal the filtered one)
"""
import json
import math
import os

import numpy as np
import pytest
import torch

from gendiff.cli import main
from gendiff.experiments.config import resolve
from gendiff.experiments.filtering import (against_random, filter_run, over_seeds, random_subsets,
                                           sample_scored)
from gendiff.experiments.images import build_model
from gendiff.experiments.recipes import IMAGE_RECIPES
from gendiff.experiments.runfolder import start_run
from gendiff.heads import make_head
from gendiff.io import save_json, save_state
from gendiff.precond import Denoiser, EDMPrecond
from gendiff.samplers import sample_heun
from gendiff.schedules import edm_sigmas
from gendiff.scores import CountCalls
from gendiff.uncertainty import SCORE_SIGMAS, ExcessVarianceScore, keep_most_certain

pytestmark = pytest.mark.usefixtures("one_thread")

SD = 0.5   # σ_data


class Analytic(torch.nn.Module):
    """A backbone with known outputs: F = a·x_in, G = c + b·tanh(x_in) per element (b = 0: G ≡ c)."""

    def __init__(self, a=0.5, b=0.0, c=-0.3):
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def forward(self, x_in, c_noise):
        return self.a * x_in, self.c + self.b * torch.tanh(x_in)


def _excess_closed_form(head: str, s: float, c: float) -> float:
    """σ_φ² − σ² of a constant G = c, clamped at 0 (T8), from T5 and T6 / T37 written out."""
    c_out2 = s * s * SD * SD / (s * s + SD * SD)                              # c_out = σσ_d/√(σ² + σ_d²)
    var = (s * s + c_out2) * math.exp(c) if head == "diag" else s * s + c_out2 * math.exp(c)   # T6 / T37
    return max(var - s * s, 0.0)


@pytest.mark.parametrize("head", ["diag", "excess"])
def test_score_is_the_closed_form_excess_over_the_grid(head):
    """G ≡ −0.3: under T6 σ_φ² = c_var²·e^G falls below σ² above σ ≈ 0.68 (clamped to 0 there); under T37
    the excess is c_out²·e^G. The score is the mean over the grid's σ_i in [0.05, 2] (one per Heun step) of
    the closed form, whatever x is."""
    den = Denoiser(Analytic(), EDMPrecond(SD), head)
    rec = ExcessVarianceScore(den, *SCORE_SIGMAS)
    grid = edm_sigmas(18, 0.002, 80.0, 7.0)
    sample_heun(rec, torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 80, grid)
    steps = [float(s) for s in grid[:-1] if SCORE_SIGMAS[0] <= float(s) <= SCORE_SIGMAS[1]]
    assert len(steps) == 6 and len(rec.sigmas) == 6
    want = sum(_excess_closed_form(head, s, -0.3) for s in steps) / len(steps)
    if head == "diag":
        assert any(_excess_closed_form(head, s, -0.3) == 0 for s in steps)     # the clamp is exercised
    torch.testing.assert_close(rec.scores(), torch.full((3,), want, dtype=torch.float32), rtol=1e-5, atol=0)


def test_score_is_the_mean_over_the_trajectory_points():
    """With G depending on x, Heun's corrector point differs from the trajectory point: the score is the mean
    over the steps i (σ_i in range) of mean(σ_φ² − σ²)⁺ at the trajectory point x_i whose μ the callback
    reports, recomputed here by hand from the callback's x."""
    den = Denoiser(Analytic(a=0.8, b=1.5, c=-0.2), EDMPrecond(SD), "diag")
    rec = ExcessVarianceScore(den, 0.03, 3.0)
    grid = edm_sigmas(12, 0.002, 80.0, 7.0)
    x0 = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(1)) * 80
    xs = [x0]
    sample_heun(rec, x0, grid, callback=lambda i, x, s_next, denoised: xs.append(x))
    by_hand = []
    for i, s in enumerate(float(v) for v in grid[:-1]):
        if 0.03 <= s <= 3.0:
            p = den.predict(xs[i], s)
            by_hand.append((p.variance() - s * s).clamp_min(0).flatten(1).mean(1))
    want = torch.stack(by_hand).mean(0)
    assert len(by_hand) >= 4 and want.std() > 1e-3 * want.mean()            # the samples differ
    torch.testing.assert_close(rec.scores(), want, rtol=1e-5, atol=1e-7)
    assert rec.sigmas == [float(s) for s in grid[:-1].float() if 0.03 <= float(s) <= 3.0]


def test_scoring_costs_no_network_evaluation():
    """The wrapper's call is one predict: Heun's NFE stays 2·steps − 1, and μ is the denoiser's."""
    den = CountCalls(Denoiser(Analytic(b=1.0), EDMPrecond(SD), "diag"))
    grid = edm_sigmas(10, 0.002, 80.0, 7.0)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 80
    plain = sample_heun(den, x, grid)
    den.calls = 0
    scored = sample_heun(ExcessVarianceScore(den), x, grid)
    assert den.calls == 2 * 10 - 1
    assert torch.equal(plain, scored)


def test_a_range_without_steps_and_a_per_example_sigma_are_errors():
    den = Denoiser(Analytic(), EDMPrecond(SD), "diag")
    rec = ExcessVarianceScore(den, 100.0, 200.0)
    sample_heun(rec, torch.randn(2, 1, 2, 2) * 80, edm_sigmas(4, 0.002, 80.0, 7.0))
    with pytest.raises(ValueError, match=r"no sampler step had σ in \[100, 200\]"):
        rec.scores()
    with pytest.raises(ValueError, match="one σ per call"):
        ExcessVarianceScore(den)(torch.zeros(2, 1, 2, 2), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="sigma_min=3.0 must be <= sigma_max=1.0"):
        ExcessVarianceScore(den, 3.0, 1.0)


@pytest.fixture(scope="module")
def shapes_npz(tmp_path_factory):
    """40 labelled 16×16 8-bit images: a bright square (class 0) or a bar (class 1) at a random place."""
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = np.full((40, 16, 16), 20, np.uint8)
    for i, k in enumerate(y):
        r, c = rng.integers(0, 8, 2)
        h, w = (5, 5) if k == 0 else (2, 8)
        x[i, r:r + h, c:c + w] = rng.integers(150, 255)
    path = tmp_path_factory.mktemp("filter") / "shapes.npz"
    np.savez(path, images=x, labels=y)
    return str(path)


def _cfg(path, recipe="confidence", *sets):
    return resolve("mnist-tiny", sets=["data.name=npz", f"data.path={path}", "model.attn_resolutions=[]",
                                       f"recipe={recipe}", "eval.sampler_steps=8", "train.sigma_data=0.5",
                                       *sets])  # σ_data given: these tests build models without prepare


def test_scores_do_not_depend_on_the_batch_split(shapes_npz):
    """Image i's score comes from its own generator (seed, i), like the image: batches of 3 and of 5 give the
    same 10 scores (measured: equal to the bit on this CPU), and the NFE is Heun's 2·8 − 1."""
    cfg = _cfg(shapes_npz)
    torch.manual_seed(0)
    model = build_model(cfg, (1, 16, 16), 2).eval()
    for p in model.parameters():                 # a non-trivial network (the output layer starts at zero)
        torch.nn.init.normal_(p, std=0.2)
    a, sa, ia = sample_scored(model, cfg, 10, seed=3, batch=3)
    b, sb, ib = sample_scored(model, cfg, 10, seed=3, batch=5)
    assert sa.shape == (10,) and ia["nfe"] == ib["nfe"] == 15
    assert sa.std() > 1e-3 * sa.mean()                                       # the scores differ per image
    torch.testing.assert_close(sa, sb, rtol=1e-5, atol=0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    _, sc, _ = sample_scored(model, cfg, 10, seed=4, batch=5)
    assert not torch.allclose(sa, sc)


def test_the_kept_set_is_exactly_the_lowest_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1000, generator=g)
    kept, dropped = keep_most_certain(scores, 0.1)
    assert len(kept) == 900 and len(dropped) == 100
    assert set(kept.tolist()) == set(torch.argsort(scores)[:900].tolist())
    assert scores[kept].max() < scores[dropped].min()
    assert torch.equal(torch.sort(torch.cat([kept, dropped])).values, torch.arange(1000))
    tied = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.0, 3.0])          # ties at the cut go by index (stable)
    kept, dropped = keep_most_certain(tied, 0.34)                  # round(6·0.34) = 2 dropped
    assert kept.tolist() == [0, 1, 2, 4] and dropped.tolist() == [3, 5]
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="fraction="):
            keep_most_certain(scores, bad)
    with pytest.raises(ValueError, match="drops 0"):
        keep_most_certain(torch.rand(4), 0.1)


def test_random_subsets_are_seeded_and_of_equal_size():
    a = random_subsets(50, 45, 6, seed=3)
    assert len(a) == 6 and all(len(s) == 45 and len(set(s.tolist())) == 45 for s in a)
    assert all(0 <= int(s.min()) and int(s.max()) < 50 for s in a)
    assert all(torch.equal(x, y) for x, y in zip(a, random_subsets(50, 45, 6, seed=3)))
    assert not all(torch.equal(x, y) for x, y in zip(a, random_subsets(50, 45, 6, seed=4)))
    assert len({tuple(s.tolist()) for s in a}) == 6                       # different subsets within a seed


def test_comparison_with_random_subsets():
    """FID: lower is better, so the gain is random mean − filtered; precision and recall: filtered − mean;
    `beats_random` is gain > the subsets' sd (n − 1); over seeds, the mean gain against its sd."""
    rows = [{"fid": 12.0, "precision": 0.5, "recall": 0.6}, {"fid": 14.0, "precision": 0.7, "recall": 0.6}]
    v = against_random({"fid": 10.0, "precision": 0.65, "recall": 0.5}, rows)
    assert v["fid"]["random_mean"] == 13.0 and v["fid"]["random_sd"] == pytest.approx(math.sqrt(2))
    assert v["fid"]["gain"] == 3.0 and v["fid"]["beats_random"]
    assert v["precision"]["gain"] == pytest.approx(0.05) and not v["precision"]["beats_random"]
    assert v["recall"]["gain"] == pytest.approx(-0.1) and not v["recall"]["beats_random"]
    worse = against_random({"fid": 16.0, "precision": 0.6, "recall": 0.6}, rows)
    assert worse["fid"]["gain"] == -3.0 and not worse["fid"]["beats_random"]
    o = over_seeds([{"versus_random": v}, {"versus_random": worse}])
    assert o["fid"]["gain_mean"] == 0.0 and o["fid"]["gain_sd"] == pytest.approx(math.sqrt(18))
    assert o["fid"]["seeds_beating_random"] == 1
    assert not o["fid"]["beats_random_by_more_than_the_seed_spread"]
    assert over_seeds([{"versus_random": v}])["fid"]["beats_random_by_more_than_the_seed_spread"] is None


def _folder(cfg, out, model):
    """A run folder without training: config, weights and data.json, what `load_run` reads."""
    start_run(cfg, out)
    save_state(model.state_dict(), os.path.join(out, "model.safetensors"))
    if cfg.kind == "images":
        save_json({"shape": [1, 16, 16], "num_classes": 2}, os.path.join(out, "data.json"))


def test_refusals(shapes_npz, tmp_path, capsys):
    """Runs without a learned confidence (no head, IDDPM's v) and toy runs: one line naming --filter. Bad
    option values: one line naming the option."""
    for recipe, r in IMAGE_RECIPES.items():
        if not make_head(r.head).has_confidence:
            with pytest.raises(ValueError, match=rf"--filter needs a run with a learned confidence σ_φ; "
                                                 rf"recipe='{recipe}' has head='{r.head}'"):
                filter_run(str(tmp_path), _cfg(shapes_npz, recipe), None, fraction=0.1)
    edm = _cfg(shapes_npz, "edm")
    _folder(edm, str(tmp_path / "edm"), build_model(edm, (1, 16, 16), 2))
    assert main(["eval", str(tmp_path / "edm"), "--filter", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--filter needs a run with a learned confidence" in err and "head='none'" in err
    assert len(err.strip().splitlines()) == 1
    from gendiff.experiments import toy
    tcfg = resolve("toy-quick")
    _folder(tcfg, str(tmp_path / "toy"), toy.build_model(tcfg))
    assert main(["eval", str(tmp_path / "toy"), "--filter", "0.1"]) == 2
    assert "--filter does not apply to a toy run" in capsys.readouterr().err
    conf = _cfg(shapes_npz)
    run = str(tmp_path / "conf")
    _folder(conf, run, build_model(conf, (1, 16, 16), 2))
    for args, says in ((["--filter", "1.5"], "--filter=1.5 must be a number in (0, 1)"),
                       (["--filter", "0.1", "--filter-sigmas", "2"], "--filter-sigmas='2' must be two"),
                       (["--filter", "0.1", "--filter-sigmas", "2,1"], "--filter-sigmas=2.0,1.0 must be"),
                       (["--filter", "0.1", "--seeds", "1,1"], "repeats a seed"),
                       (["--seeds", "0,1"], "--seeds goes with --filter"),
                       (["--filter-subsets", "3"], "--filter-subsets goes with --filter")):
        assert main(["eval", run, *args]) == 2, args
        assert says in capsys.readouterr().err, args
    bare = tmp_path / "bare.npz"                                             # images without labels
    np.savez(bare, images=np.zeros((20, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="--filter measures samples .* has no labels"):
        filter_run(run, _cfg(str(bare)), None, fraction=0.1)
    with pytest.raises(SystemExit):                                          # argparse: at least 2 subsets
        main(["eval", run, "--filter", "0.1", "--filter-subsets", "1"])
    assert "--filter-subsets must be finite and >= 2" in capsys.readouterr().err


def test_filter_from_the_cli_on_a_trained_run(shapes_npz, tmp_path, capsys):
    """A tiny confidence run trained from the CLI, then `gendiff eval RUN --filter 0.25` over two seeds: the
    json holds the comparison per seed and over seeds; the dropped are the highest of the recorded scores;
    the random subsets are not the kept set."""
    run = str(tmp_path / "run")
    sets = ["--preset", "mnist-tiny", "--set", "model.attn_resolutions=[]", "--set", "recipe=confidence",
            "--set", "data.name=npz", "--set", f"data.path={shapes_npz}", "--set", "train.iterations=8",
            "--set", "eval.samples=8", "--set", "eval.calibration_images=2", "--set",
            "eval.likelihood_images=2", "--threads", "1", "--no-progress"]
    assert main(["train", *sets, "--out", run]) == 0
    capsys.readouterr()
    assert main(["eval", run, "--filter", "0.25", "--samples", "12", "--steps", "8", "--filter-subsets", "3",
                 "--seeds", "0,1"]) == 0
    said = capsys.readouterr().out
    assert "3 most uncertain dropped, 9 kept against 3 random subsets" in said and "seed 1:" in said
    path = os.path.join(run, "filter-0.25-8-12-seeds0-1.json")
    m = json.load(open(path))
    assert {"fraction", "samples", "kept", "dropped", "subsets", "seeds", "sampler", "nfe", "score",
            "classifier_test_accuracy", "sample_metrics_unreliable", "per_seed", "over_seeds"} <= set(m)
    assert (m["kept"], m["dropped"], m["seeds"], m["nfe"]) == (9, 3, [0, 1], 15)
    assert m["score"]["sigma_range"] == list(SCORE_SIGMAS)
    for s in m["per_seed"]:
        assert {"all", "filtered", "versus_random", "dropped_class_counts", "dropped_indices", "scores",
                "score_sigmas"} <= set(s)
        assert sorted(s["dropped_indices"]) == sorted(np.argsort(s["scores"], kind="stable")[-3:].tolist())
        assert sum(s["dropped_class_counts"]) == 3 and len(s["dropped_class_counts"]) == 2
        for name in ("fid", "precision", "recall"):
            v = s["versus_random"][name]
            assert len(v["random"]) == 3 and v["filtered"] == s["filtered"][name]
            assert np.isfinite(v["random_sd"]) and isinstance(v["beats_random"], bool)
        assert any(r != s["filtered"]["fid"] for r in s["versus_random"]["fid"]["random"])
        assert all(SCORE_SIGMAS[0] <= x <= SCORE_SIGMAS[1] for x in s["score_sigmas"])
    assert m["per_seed"][0]["scores"] != m["per_seed"][1]["scores"]
    assert set(m["over_seeds"]) == {"fid", "precision", "recall"}
    assert all(os.path.exists(path[:-5] + f"-{k}.png") for k in ("dropped", "kept"))
