"""EDM2's power-function EMA and its post-hoc reconstruction (gendiff/ema.py) against direct computation.

Breakages tried (the test that catches each): profile inner product with m^(γa+γb) for m^(γa+γb+1) (stored
snapshot reproduced, trajectory oracle); b built from the target's γ on both sides (trajectory oracle); the
coefficients applied to snapshots in reverse order (stored snapshot reproduced); post-hoc EMAs not in the
checkpoint (resume test); post-hoc EMA updated with the main EMA's decay (trajectory through train).
"""
import numpy as np
import pytest
import torch

from gendiff.ema import load_posthoc, posthoc_coefficients, posthoc_ema, power_ema_decay, power_ema_gamma

pytestmark = pytest.mark.usefixtures("one_thread")


def _discrete_ema(theta, gamma):
    """θ̂_t = β_t·θ̂_{t−1} + (1 − β_t)·θ_t with β_t = (1 − 1/t)^(γ+1) (train.py's update), all t."""
    out, e = [], 0.0
    for t, th in enumerate(theta, start=1):
        b = power_ema_decay(t, gamma)
        e = b * e + (1 - b) * th
        out.append(e)
    return out if torch.is_tensor(out[0]) else np.array(out)


def test_a_stored_snapshot_is_reconstructed_by_itself():
    steps = [1000, 2000, 3000, 1000, 2000, 3000]
    gammas = [power_ema_gamma(0.05)] * 3 + [power_ema_gamma(0.1)] * 3
    for i in (2, 4):
        x = posthoc_coefficients(steps, gammas, steps[i], 0.05 if i < 3 else 0.1)
        want = np.eye(6)[i]
        assert np.abs(x - want).max() < 1e-4, x


def test_reconstruction_matches_the_direct_power_ema_of_a_trajectory():
    T, K = 4000, 250
    t = np.arange(1, T + 1)
    theta = np.sin(t / 300.0) + 1e-3 * t + 0.3 * np.cos(t / 47.0)          # a wandering scalar "weight"
    g1, g2 = power_ema_gamma(0.05), power_ema_gamma(0.15)
    e1, e2 = _discrete_ema(theta, g1), _discrete_ema(theta, g2)
    snaps = [(s, g, {"w": torch.tensor([e[s - 1]], dtype=torch.float64)}) for g, e in ((g1, e1), (g2, e2))
             for s in range(K, T + 1, K)]
    for target in (0.08, 0.12):
        want = _discrete_ema(theta, power_ema_gamma(target))[-1]
        got = posthoc_ema(snaps, T, target)["w"].item()
        gap = abs(e1[-1] - e2[-1])
        assert abs(got - want) < 0.05 * gap, (target, got, want, gap)


def test_bad_sigma_rel_is_refused():
    with pytest.raises(ValueError, match="ema_sigma_rel"):
        posthoc_coefficients([100], [5.0], 100, 0.5)
    with pytest.raises(ValueError, match="ema_posthoc"):
        posthoc_ema([], 100, 0.1)


def test_training_writes_posthoc_snapshots_that_resume_exactly(tmp_path):
    from gendiff.losses import EDMLoss
    from gendiff.nets.mlp import toy_denoiser
    from gendiff.schedules import LogNormalSigma
    from gendiff.data.sources import DataSource
    from gendiff.experiments.config import ToyTrainConfig
    from gendiff.train import Outputs, train
    data = torch.randn(64, 2) * 0.5

    trajectory = []

    def run(iters, folder, ck=None):
        torch.manual_seed(0)
        den = toy_denoiser("none", 2, 8, 1)
        cfg = ToyTrainConfig(iterations=iters, batch=16, snapshot_every=4, width=8, hidden_layers=1,
                             ema_posthoc=(0.05, 0.1))
        train(den, EDMLoss(), DataSource(data), cfg, progress=False, sigma_density=LogNormalSigma(),
              outputs=Outputs(posthoc_dir=str(folder), checkpoint_dir=ck, checkpoint_every=4),
              callbacks=[lambda done, r: trajectory.append({k: v.clone()
                                                            for k, v in den.state_dict().items()})])
        return load_posthoc(str(folder))
    full = run(12, tmp_path / "full")
    for step, gamma, snap in full:                       # each snapshot is the power EMA of the weights (γ)
        for k, v in snap.items():
            want = _discrete_ema([w[k].double() for w in trajectory[:step]], gamma)[-1]
            torch.testing.assert_close(v.double(), want, atol=1e-6, rtol=1e-5)
    assert sorted({(s, round(g, 6)) for s, g, _ in full}) == sorted(
        (s, round(power_ema_gamma(v), 6)) for s in (4, 8, 12) for v in (0.05, 0.1))
    ck = str(tmp_path / "ck")
    run(6, tmp_path / "part", ck)
    resumed = run(12, tmp_path / "part", ck)
    assert {s for s, _, _ in resumed} == {4, 6, 8, 12}       # the stopped run's last step (6) was kept too
    resumed = [x for x in resumed if x[0] != 6]
    assert len(resumed) == len(full)
    for (s1, g1, a), (s2, g2, b) in zip(full, resumed):
        assert (s1, g1) == (s2, g2) and all(torch.equal(a[k], b[k]) for k in a)
    last = [s for s in full if s[0] == 12]
    rec = posthoc_ema(full, 12, 0.05)
    own = next(s for s in last if abs(s[1] - power_ema_gamma(0.05)) < 1e-9)[2]
    for k in rec:
        torch.testing.assert_close(rec[k], own[k], atol=1e-4, rtol=1e-4)


def test_posthoc_ema_from_the_cli(tmp_path):
    import json
    import os
    from gendiff.cli import main
    out = str(tmp_path / "run")
    assert main(["train", "--preset", "toy-quick", "--set", "recipe=edm", "--set", "train.iterations=64",
                 "--set", "train.snapshot_every=16", "--set", "train.ema_posthoc=[0.05, 0.1]",
                 "--set", "eval.samples=256", "--set", "eval.eval_points=256", "--out", out,
                 "--no-progress"]) == 0
    assert len(os.listdir(os.path.join(out, "posthoc"))) == 8        # 4 snapshots × 2 σ_rel
    assert main(["posthoc-ema", out, "--sigma-rel", "0.08"]) == 0
    name = "model-posthoc-0.080-64.safetensors"
    assert main(["eval", out, "--weights", name, "--samples", "256", "--steps", "8"]) == 0
    m = json.load(open(os.path.join(out, "eval-heun-8-tweedie-model-posthoc-0.080-64.json")))
    assert np.isfinite(m["mmd"]) and m["nfe"] == 15
    from safetensors.torch import load_file
    a, b = load_file(os.path.join(out, name)), load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)   # another average of the run
    assert main(["posthoc-ema", str(tmp_path), "--sigma-rel", "0.08"]) == 2     # not a run folder
    assert main(["posthoc-ema", out, "--sigma-rel", "0.5"]) == 2               # σ_rel out of range


def test_ema_objects_update_by_lerp_and_round_trip_their_state():
    """EMA(decay) and PowerEMA(σ_rel) average `model` with θ ← d·θ + (1 − d)·θ_model, d = their decay of the
    step; `.module` is a frozen copy; state_dict / load_state_dict restore it exactly."""
    from gendiff.ema import EMA, PowerEMA
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    for ema, decay in ((EMA(model, 0.9), lambda t: 0.9),
                       (PowerEMA(model, 0.1), lambda t: power_ema_decay(t, power_ema_gamma(0.1)))):
        assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
        want = [p.detach().clone() for p in model.parameters()]
        for t in (1, 2, 3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            ema.update(model, t)
            want = [w * decay(t) + p.detach() * (1 - decay(t)) for w, p in zip(want, model.parameters())]
        for a, b in zip(ema.module.parameters(), want):
            torch.testing.assert_close(a, b)
        other = type(ema)(torch.nn.Linear(3, 2), 0.1 if isinstance(ema, PowerEMA) else 0.9)
        other.load_state_dict(ema.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(other.module.parameters(), ema.module.parameters()))
