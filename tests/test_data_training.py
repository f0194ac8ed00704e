"""The training loop on datasets: DataSource (epoch order, exact resume, label dropout,
validation before training), class labels through the one denoiser contract, classifier-free guidance (T33),
seed 004's objectives (score-vp parameterisation, simplified losses, IDDPM's hybrid loss, T21, T24, T26).

Breakages tried (the test that catches each): DataSource without a fresh permutation per epoch (epoch covers
every example); data order not checkpointed (resume bit for bit); label dropout to label 0 instead of ∅
(dropout test); labels not passed on by NoisyBatch.predict (conditional loss differs by label); T33 weight
w instead of 1 + w (CFG combination); ScoreVP c_out without 1/√(1 + σ²) (Tweedie vs parameterizations);
DDPMSteps table as 1 − ᾱ (steps round trip, σ̃ values); HybridLoss: β and β̃ swapped, z = x̃ (no √ᾱ),
mean gradient not stopped, T·L_t without T (Monte-Carlo vs ddpm_vlb, stop-gradient test); simplified x0 and
ε targets swapped (closed form).
"""
import math

import pytest
import torch

from gendiff.guidance import Conditioned, classifier_free
from gendiff.heads import LearnedVarianceHead
from gendiff.likelihood import ddpm_vlb
from gendiff.losses import DDPMSimpleLoss, HybridLoss, NoisyBatch
from gendiff.parameterizations import to_x0
from gendiff.precond import Denoiser, ScoreVPPrecond
from gendiff.process import DDPM
from gendiff.schedules import DDPMSteps, LogNormalSigma
from gendiff.data.sources import DataSource, check_data
from gendiff.experiments.config import ToyTrainConfig
from gendiff.train import Outputs, train

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


class LabelNet(torch.nn.Module):
    """F = a·x + b[y] (+ G = g): a tiny class-conditional backbone with a null class row (∅ = num_classes)."""

    def __init__(self, num_classes=3, dim=4, g=None):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(
            torch.linspace(-1, 1, (num_classes + 1) * dim).reshape(num_classes + 1, dim))
        self.num_classes, self.g = num_classes, g

    def forward(self, x, c_noise, class_labels=None):
        y = torch.full((x.shape[0],), self.num_classes) if class_labels is None else class_labels
        F = self.a * x + self.b[y].reshape(x.shape)
        return F if self.g is None else (F, torch.full_like(x, self.g) + 0 * self.a)


def test_data_source_epochs_cover_every_example_once():
    data = torch.arange(10.0)[:, None]
    src = DataSource(data)
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([src.draw(4, torch.full((4,), 0.1), g).x0 for _ in range(5)]).flatten()  # 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])           # a fresh order each epoch


def test_data_source_state_resumes_the_same_order():
    data = torch.randn(7, 2)
    a, b = DataSource(data), DataSource(data)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    sig = torch.full((3,), 0.5)
    for _ in range(2):
        a.draw(3, sig, ga)
        b.draw(3, sig, gb)
    state, gstate = b.state_dict(), gb.get_state()
    c, gc = DataSource(data), torch.Generator()
    c.load_state_dict(state)
    gc.set_state(gstate)
    for _ in range(4):
        x, y = a.draw(3, sig, ga), c.draw(3, sig, gc)
        assert torch.equal(x.x0, y.x0) and torch.equal(x.x_noisy, y.x_noisy)


def test_label_dropout_uses_the_null_class():
    labels = torch.zeros(1000, dtype=torch.long)
    src = DataSource(torch.randn(1000, 2), labels, num_classes=5, label_dropout=0.3)
    y = src.draw(1000, torch.ones(1000), torch.Generator().manual_seed(0)).labels
    assert set(y.unique().tolist()) == {0, 5}
    assert abs((y == 5).float().mean().item() - 0.3) < 0.05
    assert src.draw(8, torch.ones(8), torch.Generator()).labels.dtype == torch.long


@pytest.mark.parametrize("data, labels, kw, match", [
    (torch.zeros(0, 1, 4, 4), None, {}, "empty"),
    (torch.full((3, 1, 4, 4), float("nan")), None, {}, "NaN"),
    (torch.zeros(3, 1, 4, 5), None, {"shape": (1, 4, 4)}, "shape"),
    (torch.zeros(3, 1, 4, 4, dtype=torch.uint8), None, {}, "dtype"),
    (torch.zeros(3, 2), torch.tensor([0, 1, 7]), {"num_classes": 3}, "out of range"),
    (torch.zeros(3, 2), torch.tensor([0, 1]), {"num_classes": 3}, "one class per example"),
    (torch.zeros(3, 2), None, {"num_classes": 3}, "no labels"),
])
def test_bad_data_is_refused_before_training(data, labels, kw, match):
    with pytest.raises(ValueError, match=match):
        check_data(data, labels, **kw)
    with pytest.raises(ValueError, match=match):
        DataSource(data, labels, **kw)


def test_bad_label_dropout():
    with pytest.raises(ValueError, match="label_dropout"):
        DataSource(torch.zeros(3, 2), label_dropout=0.1)
    with pytest.raises(ValueError, match="label_dropout"):
        DataSource(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 2, label_dropout=1.0)


def test_labels_reach_the_backbone_through_losses():
    from gendiff.losses import EDMLoss
    den = Denoiser(LabelNet(), 0.5)
    x = torch.randn(2, 4)
    b = lambda y: NoisyBatch(x, x, torch.tensor([0.5, 0.5]), labels=torch.tensor(y))  # noqa: E731
    assert not torch.allclose(EDMLoss()(den, b([0, 0])), EDMLoss()(den, b([1, 1])))
    assert torch.equal(EDMLoss()(den, b([3, 3])), EDMLoss()(den, NoisyBatch(x, x, torch.tensor([0.5, 0.5]))))


def test_classifier_free_guidance_is_t33():
    den = Denoiser(LabelNet(), 0.5)
    x, s, y = torch.randn(3, 4), torch.tensor(0.7), torch.tensor([0, 1, 2])
    cond, uncond = den(x, s, class_labels=y), den(x, s, class_labels=torch.full((3,), 3))
    assert torch.equal(classifier_free(den, y, 3, 0.0)(x, s), cond)        # w = 0: the conditional model
    assert torch.equal(Conditioned(den, y)(x, s), cond)
    for w in (1.0, 5.0):                                                  # (1 + w)·D(y) − w·D(∅) (T13 linear)
        torch.testing.assert_close(classifier_free(den, y, 3, w)(x, s), (1 + w) * cond - w * uncond)
    p = classifier_free(den, y, 3, 2.0).predict(x, s)
    torch.testing.assert_close(p.mu, 3 * cond - 2 * uncond)
    with pytest.raises(ValueError, match="cfg weight"):
        classifier_free(den, y, 3, -1.0)


def test_score_vp_precond_is_tweedie_of_the_vp_latent():
    sig = torch.tensor([0.05, 0.8, 4.0], dtype=F64).reshape(-1, 1)
    x, F = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    sc = ScoreVPPrecond(1.0)(sig)
    d = sc.c_skip * x + sc.c_out * F
    alpha = 1 / (1 + sig.square()).sqrt()                                # z = α·x̃, σ_vp = α·σ̃ (T2)
    torch.testing.assert_close(d, to_x0("score", F, alpha * x, alpha, alpha * sig))
    torch.testing.assert_close(sc.c_in * x, alpha * x)                   # σ_d = 1: the net sees z itself


def test_ddpm_steps_draw_table_values_and_invert():
    ddpm = DDPM(T=50)
    st = DDPMSteps(ddpm)
    s = st.sample(500, torch.Generator().manual_seed(0))
    t = st.steps(s)
    assert t.min() >= 1 and t.max() <= 50 and len(t.unique()) > 40
    want = ((1 - ddpm.alpha_bar[t]) / ddpm.alpha_bar[t]).sqrt().float()
    assert torch.equal(s, want)
    with pytest.raises(ValueError, match="not a step"):
        st.steps(torch.tensor([0.123]))


def test_simplified_losses_closed_form():
    x0, x = torch.randn(4, 3), torch.randn(4, 3)
    sig = torch.tensor([0.1, 0.5, 1.0, 2.0])
    den = Denoiser(LabelNet(dim=3), "x0")
    mu = den(x, sig)
    b = NoisyBatch(x0, x, sig)
    torch.testing.assert_close(DDPMSimpleLoss("x0")(den, b), (mu - x0).square().sum(1))
    eps, eps_hat = (x - x0) / sig[:, None], (x - mu) / sig[:, None]
    torch.testing.assert_close(DDPMSimpleLoss("eps")(den, b), (eps - eps_hat).square().sum(1))


def _eight_bit(n, d, g):
    return torch.randint(0, 256, (n, d), generator=g).to(F64) * 2 / 255 - 1


@pytest.mark.parametrize("G", [1.0, -0.2])
def test_hybrid_vlb_term_is_an_unbiased_estimate_of_ddpm_vlb(G):
    """E_t[T·L_t] over uniform t = the bound's diffusion + reconstruction terms of ddpm_vlb with the same
    learned v = (G + 1)/2 (G = 1: Σ = β, where the t = 1 decoders of both coincide even without the β̃_2
    clipping)."""
    torch.manual_seed(0)
    ddpm, g = DDPM(T=8, beta_start=0.01, beta_end=0.2), torch.Generator().manual_seed(3)
    den = Denoiser(LabelNet(num_classes=1, dim=3, g=G), 1.0, head=LearnedVarianceHead()).double()
    x0 = _eight_bit(1, 3, g).expand(4000, 3)
    steps = DDPMSteps(ddpm)
    sigma = steps.sample(4000, g).double()
    xn = x0 + sigma[:, None] * torch.randn(x0.shape, generator=g, dtype=F64)
    loss = HybridLoss(steps, lam=1.0)
    with torch.no_grad():
        per = loss(den, NoisyBatch(x0, xn, sigma))
        simple = DDPMSimpleLoss("eps")(den, NoisyBatch(x0, xn, sigma))
    est = (per - simple) / 1.0                                         # λ·T·L_t with λ = 1
    refs = [ddpm_vlb(den, x0[:1], ddpm, decoder="discretized", v=lambda z, t: (G + 1) / 2,
                     generator=torch.Generator().manual_seed(i)) for i in range(300)]
    ref = torch.stack([r["diffusion"] + r["reconstruction"] for r in refs]).flatten()
    se = math.sqrt(est.var().item() / len(est) + ref.var().item() / len(ref))
    assert abs(est.mean().item() - ref.mean().item()) < 4 * se, (est.mean(), ref.mean(), se)


def test_hybrid_loss_trains_the_mean_on_l_simple_only():
    ddpm = DDPM(T=10)
    steps = DDPMSteps(ddpm)
    g = torch.Generator().manual_seed(0)
    x0 = _eight_bit(6, 3, g).float()
    sigma = steps.sample(6, g)
    b = NoisyBatch(x0, x0 + sigma[:, None] * torch.randn(6, 3, generator=g), sigma)

    def grads(loss):
        net = LabelNet(num_classes=1, dim=3, g=0.2)
        net.g_param = torch.nn.Parameter(torch.tensor(0.2))
        den = Denoiser(net, 1.0, head="v")
        loss(den, b).sum().backward()
        return net.a.grad.clone()
    torch.testing.assert_close(grads(HybridLoss(steps, lam=10.0)), grads(DDPMSimpleLoss("eps")))


def test_learned_variance_head_gets_gradient_from_the_vlb():
    ddpm = DDPM(T=10)
    steps = DDPMSteps(ddpm)
    g = torch.Generator().manual_seed(0)

    class VNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.v = torch.nn.Parameter(torch.tensor(0.0))

        def forward(self, x, c):
            return 0.1 * x, self.v.expand_as(x)
    x0 = _eight_bit(16, 3, g).float()
    sigma = steps.sample(16, g)
    net = VNet()
    HybridLoss(steps)(Denoiser(net, 1.0, head="v"), NoisyBatch(x0, x0 + sigma[:, None] * torch.randn(16, 3),
                                                                 sigma)).sum().backward()
    assert net.v.grad is not None and net.v.grad.abs() > 0


def test_train_loop_on_a_dataset_resumes_bit_for_bit(tmp_path):
    data = torch.randn(50, 2) * 0.5
    cfg = ToyTrainConfig(iterations=12, batch=16, lr_ref_iter=4, snapshot_every=6, width=8, hidden_layers=1)
    from gendiff.losses import EDMLoss
    from gendiff.nets.mlp import toy_denoiser

    def run(stop=None, ckdir=None):
        torch.manual_seed(0)
        den = toy_denoiser("none", 2, 8, 1)
        c = ToyTrainConfig(**{**cfg.__dict__, "iterations": stop or cfg.iterations})
        train(den, EDMLoss(), DataSource(data), c, seed=0, progress=False, sigma_density=LogNormalSigma(),
              outputs=Outputs(checkpoint_dir=ckdir, checkpoint_every=5))
        return den
    full = run()
    run(stop=7, ckdir=str(tmp_path))
    resumed = run(ckdir=str(tmp_path))
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_hybrid_vlb_term_per_step_against_t24_posteriors():
    """(hybrid − simple)/(λT) at each example's step = KL(q(x_{t−1}|x_t,x0) ‖ N(μ_θ, Σ_θ)) with both means
    from DDPM.posterior at the latent z_t = √ᾱ_t·x̃ (T24), Σ_θ of T26 at v = (G + 1)/2; t = 1: the decoder
    (T27)."""
    from gendiff.likelihood import discretized_gaussian_log_prob
    ddpm, g = DDPM(T=6, beta_start=0.02, beta_end=0.3), torch.Generator().manual_seed(5)
    steps = DDPMSteps(ddpm)
    den = Denoiser(LabelNet(num_classes=1, dim=3, g=0.4), 1.0, head="v").double()
    x0 = _eight_bit(12, 3, g)
    t = torch.arange(12) % 6 + 1
    sigma = steps.table[t - 1].double()
    xn = x0 + sigma[:, None] * torch.randn(x0.shape, generator=g, dtype=F64)
    b = NoisyBatch(x0, xn, sigma)
    with torch.no_grad():
        got = (HybridLoss(steps, lam=0.5)(den, b) - DDPMSimpleLoss("eps")(den, b)) / (0.5 * 6)
        x0_hat = den(xn, sigma)
    v = (0.4 + 1) / 2
    for i in range(12):
        ti = int(t[i])
        ab = ddpm.alpha_bar[ti]
        z = ab.sqrt() * xn[i:i + 1]
        bt = lambda k: (ddpm.betas[k] * ddpm.one_minus_alpha_bar[k - 1]  # noqa: E731
                        / ddpm.one_minus_alpha_bar[k])
        var_p = torch.exp(v * ddpm.betas[ti].log() + (1 - v) * bt(max(ti, 2)).log())
        if ti == 1:
            want = -discretized_gaussian_log_prob(x0[i:i + 1], x0_hat[i:i + 1], var_p.sqrt()).sum()
        else:
            mq, vq = ddpm.posterior(z, x0[i:i + 1], ti)
            mp, _ = ddpm.posterior(z, x0_hat[i:i + 1], ti)
            want = (0.5 * (torch.log(var_p / vq) + (vq + (mq - mp).square()) / var_p - 1)).sum()
        torch.testing.assert_close(got[i], want)


def test_respaced_ddpm_keeps_alpha_bar_at_its_steps():
    d = DDPM(T=1000, schedule="cosine")
    r = d.respaced(50)
    keep = torch.linspace(1000, 1, 50, dtype=F64).round().long().flip(0)
    assert keep[0] == 1 and keep[-1] == 1000 and len(keep.unique()) == 50
    torch.testing.assert_close(r.alpha_bar[1:], d.alpha_bar[keep], rtol=1e-10, atol=0)
    assert r.T == 50 and d.respaced(1000) is d
    # one step: from T straight to 0
    torch.testing.assert_close(d.respaced(1).alpha_bar[1], d.alpha_bar[1000])
    torch.testing.assert_close(r.alphas[1:] * torch.cat([torch.ones(1, dtype=F64), r.alpha_bar[1:-1]]),
                               r.alpha_bar[1:])                             # T23: ᾱ_t = ∏ α_i
    with pytest.raises(ValueError, match="steps"):
        d.respaced(1001)


def test_compile_option_trains_through_the_compiled_backbone(monkeypatch):
    """train.compile wraps the backbone with torch.compile (here a recording stand-in, no compiler in the
    suite): the forward passes go through it, and the weights equal an eager run's (same parameters)."""
    from gendiff.losses import EDMLoss
    from gendiff.nets.mlp import toy_denoiser
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *a, **k):
            calls.append(1)
            return self.net(*a, **k)
    monkeypatch.setattr(torch, "compile", lambda net: Recorder(net))
    data = torch.randn(32, 2) * 0.5

    def run(comp):
        torch.manual_seed(0)
        den = toy_denoiser("none", 2, 8, 1)
        cfg = ToyTrainConfig(iterations=5, batch=8, width=8, hidden_layers=1, compile=comp)
        train(den, EDMLoss(), DataSource(data), cfg, progress=False, sigma_density=LogNormalSigma())
        return den
    eager, compiled = run(False), run(True)
    assert len(calls) == 5
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()))
    assert not any(k.startswith("net.net") for k in compiled.state_dict())   # the plain module's keys
