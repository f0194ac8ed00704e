"""`gendiff train`: typed config (presets, TOML, --set) and a run folder that survives SIGKILL.

Breakages tried (each fails here): to_toml dropping a table (round trip); _coerce accepting a bool for an int
(type error test); metrics.jsonl not truncated on resume (duplicate steps); resume ignoring the checkpoint
(the killed-and-resumed model differs).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gendiff.cli import main
from gendiff.experiments.config import resolve, to_toml

QUICK = ["--preset", "toy-quick", "--set", "train.iterations=96", "--set", "train.batch=128",
         "--set", "checkpoint.every=8", "--set", "eval.samples=256", "--set", "eval.eval_points=256",
         "--threads", "1", "--no-progress"]


def test_config_resolves_in_order_and_round_trips_through_toml(tmp_path):
    cfg = resolve("toy-quick", sets=["recipe=edm", "train.betas=[0.8, 0.95]", "sampler.init=gaussian",
                                     "train.lr=0.003"])
    assert cfg.recipe == "edm" and cfg.train.betas == (0.8, 0.95) and cfg.sampler.init == "gaussian"
    assert cfg.train.iterations == 256 and cfg.train.lr == 0.003
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert resolve(toml_path=str(path)) == cfg
    path.write_text('recipe = "edm"\n[train]\nbatch = 64\n')
    assert resolve("toy-quick", str(path), ["train.batch=32"]).train.batch == 32     # --set after the file


@pytest.mark.parametrize("sets, match", [
    (["train.bogus=1"], "unknown key 'train.bogus'; allowed: train.iterations"),
    (["bogus=1"], "unknown key 'bogus'"),
    (["train.batch=abc"], "train.batch='abc' is not an integer"),
    (["train.batch=true"], "train.batch=True is not an integer"),
    (["train.batch=0"], "batch=0 must be > 0"),
    (["train.lr=nan"], "train.lr=nan is not a number"),
    (["train.betas=[0.9]"], "train.betas.*of length 2"),
    (["train=3"], "train is a table"),
    (["recipe=bogus"], "recipe='bogus'.*edm"),
    (["recipe=obj-F-edm"], "reuses another recipe's model"),
    (["kind=images"], "kind='images' does not match"),
    (["data.name=folder"], r"unknown key 'data'.*image runs: start from an image preset"),
    (["sampler.init=bogus"], "init='bogus'"),
    (["noequals"], "key=value"),
])
def test_bad_config_is_one_clear_error(sets, match):
    with pytest.raises(ValueError, match=match):
        resolve("toy-quick", sets=sets)


def test_a_rejected_config_creates_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--set", "train.batch=-3", "--out", str(out)]) == 2
    assert "batch=-3" in capsys.readouterr().err and not out.exists()
    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    assert main(["train", "--resume", str(out), "--set", "train.batch=3"]) == 2


def _cli(args):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    return subprocess.Popen([sys.executable, "-m", "gendiff.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run, step, proc, timeout=120):
    path, t0 = os.path.join(run, "metrics.jsonl"), time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if os.path.exists(path):
            with open(path) as f:
                lines = [json.loads(x) for x in f if x.strip()]
            if lines and lines[-1]["step"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged (rc {proc.poll()}): "
                         f"{proc.stderr.read() if proc.poll() else ''}")


def test_train_killed_and_resumed_from_the_cli_is_bitwise_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    p = _cli([*QUICK, "--out", ref])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    p = _cli([*QUICK, "--set", "checkpoint.every=24", "--out", run])   # checkpoints 24, 48, 72; log every 16
    _wait_for_step(run, 64, p)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    assert not os.path.exists(os.path.join(run, "model.safetensors"))
    p = _cli(["--resume", run, "--threads", "1", "--no-progress"])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert int(out.split("resumed from step ")[1].split()[0]) >= 48      # it continued, it did not start over
    a, b = (load_file(os.path.join(r, "model.safetensors")) for r in (ref, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in open(os.path.join(run, "metrics.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == 96                     # no duplicated log lines
    ma, mb = (json.load(open(os.path.join(r, "metrics.json"))) for r in (ref, run))
    assert ma["median_nll"] == mb["median_nll"] and ma["mmd"] == mb["mmd"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(os.path.join(run, "tb"))
    ea.Reload()
    tb_steps = [e.step for e in ea.Scalars("train/loss")]
    assert tb_steps == steps                                                   # purged past the checkpoint
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx([x["loss"] for x in lines], rel=1e-6)
    cfg = open(os.path.join(run, "config.toml")).read()
    assert "iterations = 96" in cfg and 'recipe = "confidence"' in cfg and 'kind = "toy"' in cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "quick")
    assert main(["train", *QUICK, "--set", "train.iterations=32", "--out", out]) == 0
    return out


def test_sample_eval_and_likelihood_commands_on_a_run_folder(finished_run, capsys):
    import numpy as np
    assert main(["eval", finished_run, "--samples", "256", "--steps", "8", "--threads", "1"]) == 0
    m = json.load(open(os.path.join(finished_run, "eval-heun-8-tweedie.json")))
    assert m["nfe"] == 15 and np.isfinite(m["median_nll"])
    assert main(["sample", finished_run, "--samples", "128", "--sampler", "pc", "--steps", "4",
                 "--score-mode", "phi", "--threads", "1"]) == 0
    assert np.load(os.path.join(finished_run, "samples-seed0", "samples.npz"))["samples"].shape == (128, 2)
    assert os.path.exists(os.path.join(finished_run, "samples-seed0", "samples.png"))
    capsys.readouterr()
    assert main(["sample", finished_run, "--cfg-weight", "2"]) == 2
    assert "--cfg-weight does not apply to a toy run" in capsys.readouterr().err
    assert main(["likelihood", finished_run, "--points", "32", "--threads", "1"]) == 0
    lk = json.load(open(os.path.join(finished_run, "likelihood.json")))
    assert all(np.isfinite(lk[k]) for k in ("pf_ode_bpd", "elbo_bpd", "exact_bpd")) and lk["pf_ode_nfe"] > 10
    capsys.readouterr()
    assert main(["eval", str(os.path.dirname(finished_run))]) == 2
    assert "run=" in capsys.readouterr().err
    # a finished run resumed is a no-op that rewrites the same model
    before = open(os.path.join(finished_run, "model.safetensors"), "rb").read()
    assert main(["train", "--resume", finished_run, "--threads", "1", "--no-progress"]) == 0
    assert open(os.path.join(finished_run, "model.safetensors"), "rb").read() == before


def _torchrun(args):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port",
                             str(port), "-m", "gendiff.cli", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_gloo_processes_train_the_same_weights_as_one(tmp_path, finished_run):
    """torchrun --nproc_per_node 2 (gloo on CPU): each rank trains on its half of the same global batch and
    the gradients are averaged, so the weights equal the one-process run's up to float rounding of the
    means."""
    from safetensors.torch import load_file
    out = str(tmp_path / "ddp")
    p = _torchrun([*QUICK, "--set", "train.iterations=32", "--out", out])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    a, b = (load_file(os.path.join(r, "model.safetensors")) for r in (finished_run, out))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 32 // 16                                    # one writer: rank 0


def test_bf16_autocast_trains_and_keeps_the_loss_in_float32():
    """precision=bf16 autocasts the forward pass; the per-example loss comes back float32 and finite, and the
    result is close to, not equal to, the float32 run (bf16 matmuls did happen)."""
    from gendiff.data.toy import tree
    from gendiff.losses import ConfidenceNLL
    from gendiff.nets.mlp import toy_denoiser
    from gendiff.data.sources import ToyBatches
    from gendiff.experiments.config import ToyTrainConfig
    from gendiff.train import train
    out = {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        den = toy_denoiser("diag")
        cfg = ToyTrainConfig(iterations=20, batch=256, snapshot_every=10**6, precision=prec)
        res = train(den, ConfidenceNLL(), ToyBatches(tree("A"), "point"), cfg, progress=False)
        assert all(torch.isfinite(torch.tensor(res.losses)))
        out[prec] = torch.cat([p.detach().flatten() for p in den.parameters()])
    assert not torch.equal(out["fp32"], out["bf16"])
    assert (out["fp32"] - out["bf16"]).abs().max() < 0.05
    with pytest.raises(ValueError, match="precision='fp16'"):
        resolve(sets=["train.precision=fp16"])


def test_power_function_ema_matches_edm2():
    """EDM2 eq. 3–4: σ_rel = 0.05 ↔ γ = 16.97 (their value); σ_rel(γ) round-trips; β_t = (1 − 1/t)^(γ+1)
    averages a trajectory θ_τ = τ to its τ^γ-weighted mean T(γ + 1)/(γ + 2) (1% at T = 1000); and train()
    applies
    it."""
    import math
    from gendiff.data.toy import tree
    from gendiff.losses import EDMLoss
    from gendiff.nets.mlp import toy_denoiser
    from gendiff.data.sources import ToyBatches
    from gendiff.ema import power_ema_decay, power_ema_gamma
    from gendiff.experiments.config import ToyTrainConfig
    from gendiff.train import train
    assert power_ema_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    for sr in (0.02, 0.1, 0.25):
        g = power_ema_gamma(sr)
        assert math.sqrt(g + 1) / ((g + 2) * math.sqrt(g + 3)) == pytest.approx(sr, rel=1e-9)
    g, e, T = power_ema_gamma(0.1), 0.0, 1000
    for t in range(1, T + 1):
        b = power_ema_decay(t, g)
        e = b * e + (1 - b) * t
    assert e == pytest.approx(T * (g + 1) / (g + 2), rel=1e-2)
    torch.manual_seed(0)
    den = toy_denoiser("none")
    traj = []
    cfg = ToyTrainConfig(iterations=12, batch=64, snapshot_every=10**6, ema_sigma_rel=0.1)
    ema0 = [p.detach().clone() for p in den.parameters()]
    res = train(den, EDMLoss(), ToyBatches(tree("A"), "point"), cfg, progress=False,
                callbacks=[lambda d, r: traj.append([p.detach().clone() for p in den.parameters()])])
    manual = ema0
    for t, params in enumerate(traj, 1):
        b = power_ema_decay(t, g)
        manual = [m.lerp(p, 1 - b) for m, p in zip(manual, params)]
    for m, p in zip(manual, res.ema.parameters()):
        assert torch.equal(m, p)
    with pytest.raises(ValueError, match="ema_sigma_rel=0.5"):
        ToyTrainConfig(ema_sigma_rel=0.5).validate()


def _browser():
    import shutil
    found = [shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")]
    return next((b for b in found if b), None)


def _render(browser, page, shot):
    """Load the page from disk in headless chromium: its DOM after the load handler ran, and a screenshot."""
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run([*base, "--dump-dom", f"file://{page}"], capture_output=True, text=True,
                         timeout=120).stdout
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2400", f"file://{page}"],
                   capture_output=True, timeout=120)
    return dom


def test_report_html_renders_in_a_real_browser(finished_run, tmp_path):
    """`gendiff report RUN` and `gendiff report RESULTS`: a self-contained index.html whose every image
    decodes in headless chromium (the page's load handler writes data-images="ok:N") and which shows the
    metrics
    table."""
    import shutil
    assert main(["report", finished_run]) == 0
    page = os.path.join(finished_run, "index.html")
    text = open(page).read()
    assert "<table" in text and "median_nll" in text and "iterations = 32" in text
    assert "src=\"data:image/png;base64," in text and "file://" not in text and "src=\"/" not in text
    results = tmp_path / "results"
    results.mkdir()
    (results / "metrics.json").write_text("{}")
    (results / "metrics.md").write_text("# title\n\n| run | MMD² |\n|---|---|\n| edm | **1e-4** |\n")
    shutil.copy(os.path.join(finished_run, "samples.png"), results / "fig.png")
    from gendiff.experiments.html import write_report
    assert "<td>edm</td><td>1e-4</td>" in open(write_report(str(results))).read()
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    for folder, n_images in ((finished_run, 3), (str(results), 1)):   # curves, samples, σ_φ map
        shot = str(tmp_path / f"{os.path.basename(folder)}.png")
        dom = _render(browser, os.path.join(folder, "index.html"), shot)
        assert f'data-images="ok:{n_images}"' in dom, dom[:300]
        assert "<table" in dom
        assert os.path.getsize(shot) > 10_000


def test_two_process_run_killed_and_resumed_matches_the_uninterrupted_one(tmp_path):
    """torchrun stopped (SIGTERM to the launcher, which kills both ranks) after step 40 and resumed with
    torchrun ... --resume: bitwise the uninterrupted 2-process run (same all-reduce order)."""
    from safetensors.torch import load_file
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    p = _torchrun([*QUICK, "--set", "checkpoint.every=24", "--out", ref])
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    p = _torchrun([*QUICK, "--set", "checkpoint.every=24", "--out", run])
    _wait_for_step(run, 40, p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) != 0
    assert not os.path.exists(os.path.join(run, "model.safetensors"))
    p = _torchrun(["--resume", run, "--threads", "1", "--no-progress"])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert "resumed from step" in out
    a, b = (load_file(os.path.join(r, "model.safetensors")) for r in (ref, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_mid_run_is_a_clear_error_and_the_last_good_checkpoint_stays(tmp_path, monkeypatch,
                                                                                   capsys):
    from gendiff import checkpoint as ckpt
    out = str(tmp_path / "run")
    real, calls = ckpt.save_file, {"n": 0}

    def filling(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(ckpt, "save_file", filling)
    assert main(["train", *QUICK, "--set", "train.iterations=40", "--out", out]) == 4
    assert "No space left on device" in capsys.readouterr().err
    assert ckpt.steps(os.path.join(out, "checkpoints")) == [8, 16]
    assert ckpt.latest(os.path.join(out, "checkpoints"))[0] == 16
