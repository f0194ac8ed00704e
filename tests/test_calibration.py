"""calibration.calibration_by_sigma against Gaussian oracles (THEORY T8): x0 ~ N(0, v) per element,
x̃ = x0 + σε, μ = E[x0 | x̃] = v/(v + σ²)·x̃ and V = Var[x0 | x̃] = vσ²/(v + σ²) exactly, so coverage, NLL,
the gain over the best constant and the reliability table all have closed forms; every tolerance is a multiple
of the sampling sd of the quantity tested.

Breakages tried (each made the named test fail, then was reverted):
- coverage_2s counting z² ≤ 2 instead of ≤ 4 → test_exact_posterior_covers_and_has_the_closed_form_nll;
  NLL without its ½ on log v → the same;
- rest taken as var ≥ floor (floor elements kept) or as all elements → test_floored_share_counts_exactly_...;
  the floor on var_x0 as floor·σ (not squared) → the same; nll_floored_all without the clamp → the same
  (nan/inf on var ≤ 0);
- the constant fitted on all examples (fit and eval) → test_constant_is_fitted_on_the_fit_split_only;
  the constant as the mean of the predicted variance → the same;
- gain signed head − baseline → test_exact_beats_the_best_constant_... and test_doubled_variance_...;
- bootstrap resampling elements instead of examples → test_bootstrap_resamples_examples_not_elements;
  the coverage sd's indicator at z² ≤ 4 for ±1 std → test_exact_posterior_covers_...;
- reliability groups sorted by the error instead of the predicted variance → test_reliability_deciles_...;
- Spearman against the signed error μ − x0 → test_spearman_ranks_the_error_by_its_predicted_std;
- rescale_coverage with C2 at z² ≤ 2c instead of 4c → test_rescaled_coverage_has_the_closed_forms (Gaussian
  and Laplace windows); the miss measured in band widths, not half widths → the same (two-point miss 4.4);
  kurtosis as E[z⁴]/E[z²] (its square dropped) → the same; the z²/4 step points left out → the same (a
  window only they find);
- fit_variance_scale's nll scale as 1/mean z² → test_variance_scale_recovers_a_doubled_variance; floored
  elements kept in the fit → the same; the recalibration of `gendiff eval --recalibrate` fitted on every image
  (fit and measured halves) → test_recalibration_is_fitted_on_the_fit_half_only; VarianceScale grouping
  by the error instead of the variance → test_grouped_scale_undoes_two_different_misscalings; tied quantile
  edges kept (an empty group: a σ-only predictor refused) → the same.
The shuffled-variance control first used for Spearman (V with its elements permuted) was not independent of
the errors (a permuted prior still correlates with the prior) and failed at 0.023 > 4/√n; it is now a variance
drawn independently of everything.
"""
import math

import numpy as np
import pytest
import torch

from gendiff.calibration import (COVERAGE_TARGET, FLOOR, GAUSS_COVERAGE_1, GAUSS_COVERAGE_2,
                                 VarianceScale, calibration_by_sigma, fit_variance_scale,
                                 reliability_figure, rescale_coverage)

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
SIGMAS = (0.1, 0.5, 2.0)
EDGES = (0.05, 0.2, 1.0, 4.0)        # one σ of SIGMAS per bin
NLL_VAR = 0.5                        # Var[½ z²] of a standard normal z: the per-element NLL variance


def gaussian(n=600, d=400, hetero=True, seed=0):
    """(μ, V, x0, σ, v): n examples of d elements, σ per example cycling through SIGMAS; prior variances v per
    element log-uniform in [0.01, 1] (hetero) or 0.25 everywhere."""
    g = torch.Generator().manual_seed(seed)
    v = (torch.empty(d, dtype=F64).uniform_(math.log(0.01), 0.0, generator=g).exp() if hetero
         else torch.full((d,), 0.25, dtype=F64))
    sigma = torch.tensor(SIGMAS, dtype=F64)[torch.arange(n) % len(SIGMAS)]
    x0 = torch.randn(n, d, generator=g, dtype=F64) * v.sqrt()
    xt = x0 + sigma[:, None] * torch.randn(n, d, generator=g, dtype=F64)
    s2 = sigma[:, None] ** 2
    return v / (v + s2) * xt, v * s2 / (v + s2), x0, sigma, v


def halves(n):
    return torch.arange(n) % 2 == 0      # σ cycles with period 3: each bin has fit and evaluation examples


def readout(mu, var, x0, sigma, **kw):
    return calibration_by_sigma(mu, var, x0, sigma, EDGES, fit=halves(len(mu)), **kw)


def eval_mask(sigma, lo, hi):
    return (~halves(len(sigma))) & (sigma >= lo) & (sigma < hi)


def test_exact_posterior_covers_and_has_the_closed_form_nll():
    mu, V, x0, sigma, _ = gaussian()
    out = readout(mu, V, x0, sigma)
    assert out["examples_fit"] == 300 and out["examples_eval"] == 300 and len(out["bins"]) == 3
    for row in out["bins"].values():
        m = eval_mask(sigma, row["sigma_lo"], row["sigma_hi"])
        h, n = row["head"], row["elements"]
        assert n == int(m.sum()) * V.shape[1] and row["rest"] == n and h["floored_share"] == 0
        for p, got in ((GAUSS_COVERAGE_1, h["coverage_1s"]), (GAUSS_COVERAGE_2, h["coverage_2s"])):
            assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / n), (p, got)
        closed = float((0.5 * torch.log(2 * math.pi * V[m]) + 0.5).mean())      # ½(log 2πV + 1)
        assert abs(h["nll"] - closed) < 4 * math.sqrt(NLL_VAR / n), (h["nll"], closed)
        assert h["nll_floored_all"] == h["nll"]                                  # nothing floored
        assert abs(h["z2_mean"] - 1) < 4 * math.sqrt(2 / n)
        for p, key in ((GAUSS_COVERAGE_1, "coverage_1s_sd"), (GAUSS_COVERAGE_2, "coverage_2s_sd")):
            assert h[key] == pytest.approx(math.sqrt(p * (1 - p) / n), rel=0.25)   # independent elements
        r = h["rescaled"]                       # a Gaussian posterior: c = 1 is inside the feasible window
        assert r["feasible"] and r["scale_lo"] < 1 < r["scale_hi"] and abs(r["kurtosis"] - 3) < 0.3


def test_exact_beats_the_best_constant_when_the_posterior_variance_varies():
    """Heteroscedastic prior: the constant's expected excess NLL is ½(log mean V − mean log V) > 0 (Jensen);
    with one prior variance V is constant in a bin and the two predictors are the same up to the fit."""
    mu, V, x0, sigma, _ = gaussian()
    for row in readout(mu, V, x0, sigma)["bins"].values():
        m = eval_mask(sigma, row["sigma_lo"], row["sigma_hi"])
        jensen = 0.5 * float(V[m].mean().log() - V[m].log().mean())
        g = row["gain"]["constant"]
        assert g["verdict"] == "head better" and g["nll"] > 0
        assert abs(g["nll"] - jensen) < 4 * g["nll_sd"] + 0.02 * jensen, (g, jensen)
        assert abs(row["constant"]["var"] - float(V[m].mean())) < 0.05 * float(V[m].mean())
    mu, V, x0, sigma, _ = gaussian(hetero=False, seed=1)
    for row in readout(mu, V, x0, sigma)["bins"].values():
        g = row["gain"]["constant"]
        assert abs(g["nll"]) < 4 * g["nll_sd"] and g["nll_sd"] < 0.01


def test_doubled_variance_is_worse_and_over_covers():
    """var = 2V: expected excess NLL ½(log 2 − ½) = 0.0966 nats, coverage P(|z| ≤ √2) = 0.8427 and
    P(|z| ≤ 2√2) = 0.9953; var = V/2: coverage P(|z| ≤ 1/√2) = 0.5205 (baselines scored the same way)."""
    mu, V, x0, sigma, _ = gaussian()
    out = readout(mu, V, x0, sigma, baselines={"x2": 2 * V, "half": V / 2})
    cover = lambda k: math.erf(k / math.sqrt(2))  # noqa: E731
    for row in out["bins"].values():
        n = row["elements"]
        g = row["gain"]["x2"]
        assert g["verdict"] == "head better"
        assert abs(g["nll"] - 0.5 * (math.log(2) - 0.5)) < 4 * g["nll_sd"]
        r2 = math.sqrt(2)
        for name, k1, k2 in (("x2", r2, 2 * r2), ("half", 1 / r2, r2)):
            for k, got in ((k1, row[name]["coverage_1s"]), (k2, row[name]["coverage_2s"])):
                assert abs(got - cover(k)) < 4 * math.sqrt(cover(k) * (1 - cover(k)) / n), (name, k, got)
        assert row["x2"]["coverage_1s"] > row["head"]["coverage_1s"] > row["half"]["coverage_1s"]
        assert row["half"]["nll"] > row["head"]["nll"] and row["gain"]["half"]["nll"] > 0


def test_floored_share_counts_exactly_the_elements_at_or_below_the_floor():
    """Elements with var_x0 at the floor (1e-3·σ)², at 0 and negative are floored; just above is not. The
    floored ones carry huge errors: included anywhere on the rest, they would move the NLL by nats."""
    mu, V, x0, sigma, _ = gaussian(n=120, d=50)
    var = V.clone()
    g = torch.Generator().manual_seed(3)
    code = torch.randint(0, 5, var.shape, generator=g)      # 0: at floor, 1: zero, 2: −1, 3: above, 4: kept
    floor_var = (FLOOR * sigma[:, None]) ** 2
    var = torch.where(code == 0, floor_var, var)
    var = torch.where(code == 1, torch.zeros_like(var), var)
    var = torch.where(code == 2, -torch.ones_like(var), var)
    var = torch.where(code == 3, floor_var * (1 + 1e-9), var)
    floored = code <= 2
    mu = torch.where(floored, x0 + 3.0, mu)
    out = readout(mu, var, x0, sigma)
    for row in out["bins"].values():
        m = eval_mask(sigma, row["sigma_lo"], row["sigma_hi"])[:, None].expand_as(var)
        h = row["head"]
        assert h["floored_share"] == float(floored[m].double().mean())
        assert row["rest"] == int((m & ~floored).sum())
        keep = m & ~floored
        e2 = (mu - x0)[keep] ** 2
        want = float((0.5 * torch.log(2 * math.pi * var[keep]) + 0.5 * e2 / var[keep]).mean())
        assert h["nll"] == pytest.approx(want, rel=1e-12)
        assert h["coverage_2s"] == pytest.approx(float((e2 <= 4 * var[keep]).double().mean()), abs=1e-12)
        clamped = torch.maximum(var, floor_var)[m]
        e2a = (mu - x0)[m] ** 2
        all_ = float((0.5 * torch.log(2 * math.pi * clamped) + 0.5 * e2a / clamped).mean())
        assert h["nll_floored_all"] == pytest.approx(all_, rel=1e-12)
        assert h["nll_floored_all"] > h["nll"] + 1e3


def test_constant_is_fitted_on_the_fit_split_only():
    mu, V, x0, sigma, _ = gaussian(n=90, d=30)
    fit = halves(len(mu))
    base = readout(mu, V, x0, sigma)
    moved_eval = readout(torch.where(fit[:, None], mu, mu + 0.7), V, x0, sigma)
    moved_fit = readout(torch.where(fit[:, None], mu + 0.7, mu), V, x0, sigma)
    for label, row in base["bins"].items():
        m = fit & (sigma >= row["sigma_lo"]) & (sigma < row["sigma_hi"])
        assert row["constant"]["var"] == pytest.approx(float(((mu - x0)[m] ** 2).mean()), rel=1e-12)
        assert moved_eval["bins"][label]["constant"]["var"] == row["constant"]["var"]
        assert moved_eval["bins"][label]["head"]["nll"] != row["head"]["nll"]
        assert moved_fit["bins"][label]["constant"]["var"] > row["constant"]["var"] + 0.4
        assert moved_fit["bins"][label]["head"] == row["head"]


def test_reliability_deciles_of_a_calibrated_predictor_lie_on_the_diagonal():
    """Each decile's mse estimates its mean V (sd ≈ √(2/n)·V, up to V's spread inside the decile); the
    doubled predictor's deciles sit at mse ≈ mean_var/2, far off the diagonal."""
    mu, V, x0, sigma, _ = gaussian()
    out = readout(mu, V, x0, sigma, baselines={"x2": 2 * V})
    for row in out["bins"].values():
        rel = row["head"]["reliability"]
        assert len(rel["n"]) == 10 and sum(rel["n"]) == row["rest"]
        assert rel["mean_var"] == sorted(rel["mean_var"]) and rel["mean_var"][-1] > 1.5 * rel["mean_var"][0]
        for v, e, k in zip(rel["mean_var"], rel["mse"], rel["n"]):
            assert abs(e / v - 1) < 4 * math.sqrt(2 / k) * 1.2, (v, e, k)
        for v, e in zip(row["x2"]["reliability"]["mean_var"], row["x2"]["reliability"]["mse"]):
            assert abs(e / v - 0.5) < 0.1


def test_spearman_ranks_the_error_by_its_predicted_std():
    """The exact V ranks |μ − x0|: its Spearman is what scipy gives on the bin's evaluation elements and far
    above the null sd 1/√n; a predictor constant in the bin has no ranking (None), one independent of the
    errors ≈ 0."""
    from scipy.stats import spearmanr
    mu, V, x0, sigma, _ = gaussian()
    g = torch.Generator().manual_seed(1)
    out = readout(mu, V, x0, sigma, baselines={"noise": 0.1 + torch.rand(V.shape, generator=g, dtype=F64)})
    for row in out["bins"].values():
        m = eval_mask(sigma, row["sigma_lo"], row["sigma_hi"])
        null = 1 / math.sqrt(row["rest"])
        want = spearmanr(V[m].flatten().sqrt().numpy(), (mu - x0)[m].flatten().abs().numpy()).statistic
        assert row["head"]["spearman"] == pytest.approx(want, abs=1e-12) and want > 4 * null
        assert row["constant"]["spearman"] is None and abs(row["noise"]["spearman"]) < 4 * null


def test_bootstrap_resamples_examples_not_elements():
    """A shared error scale per example (e.g. one image noised harder): the per-element NLL differences of an
    example move together, so the sd of the mean is that of per-example means, √(Var_examples/n_examples),
    several times what resampling elements would say. The same for the coverage's sd."""
    g = torch.Generator().manual_seed(5)
    n, d = 400, 200
    scale = torch.empty(n, 1, dtype=F64).uniform_(0.2, 3.0, generator=g)
    x0 = torch.zeros(n, d, dtype=F64)
    mu = scale * torch.randn(n, d, generator=g, dtype=F64)
    sigma = torch.full((n,), 0.5, dtype=F64)
    var = torch.ones(n, d, dtype=F64)
    out = calibration_by_sigma(mu, var, x0, sigma, (0.1, 1.0), fit=halves(n), boot=400)
    row = out["bins"]["[0.1, 1)"]
    c = row["constant"]["var"]
    ev = ~halves(n)
    diff = (0.5 * math.log(c) + 0.5 * mu[ev] ** 2 / c) - (0.5 * mu[ev] ** 2)   # constant − head, per element
    by_example = float(diff.mean(1).std() / math.sqrt(int(ev.sum())))
    by_element = float(diff.std() / math.sqrt(diff.numel()))
    sd = row["gain"]["constant"]["nll_sd"]
    assert row["gain"]["constant"]["nll"] == pytest.approx(float(diff.mean()), rel=1e-10)
    assert abs(sd / by_example - 1) < 0.2 and by_example > 3 * by_element, (sd, by_example, by_element)
    inside = (mu[ev] ** 2 <= 1).double()                 # the head's ±1 std coverage indicator (var = 1)
    cov_example = float(inside.mean(1).std() / math.sqrt(int(ev.sum())))
    assert abs(row["head"]["coverage_1s_sd"] / cov_example - 1) < 0.2, (row["head"], cov_example)


def test_sigma_per_element_bins_elements_and_bad_input_is_refused(tmp_path):
    mu, V, x0, _, _ = gaussian(n=40, d=20)
    sigma = torch.where(torch.arange(20) < 5, 0.1, 2.0).to(F64).expand(40, 20)
    out = calibration_by_sigma(mu, V, x0, sigma, EDGES, fit=halves(40), labels=["a", "b", "c"])
    assert list(out["bins"]) == ["a", "c"] and out["bins"]["a"]["elements"] == 20 * 5
    assert out["bins"]["c"]["elements"] == 20 * 15 and out["bins"]["a"]["examples"] == 20
    assert list(calibration_by_sigma(mu, V, x0, sigma, EDGES, fit=halves(40), min_examples=21)["bins"]) == []
    reliability_figure(str(tmp_path / "calibration.png"), out, title="oracle")
    assert (tmp_path / "calibration.png").stat().st_size > 1000
    s = torch.full((40,), 0.5, dtype=F64)
    for kw, match in ((dict(fit=halves(40).long()), "fit"), (dict(fit=halves(39)), "fit"),
                      (dict(fit=halves(40), baselines={"head": V}), "baselines"),
                      (dict(fit=halves(40), labels=["a"]), "labels"),
                      (dict(fit=halves(40), floor=0.0), "floor")):
        with pytest.raises(ValueError, match=match):
            calibration_by_sigma(mu, V, x0, s, EDGES, **kw)
    with pytest.raises(ValueError, match="bins"):
        calibration_by_sigma(mu, V, x0, s, (1.0, 0.5), fit=halves(40))
    with pytest.raises(ValueError, match="not finite"):
        calibration_by_sigma(mu, V * np.nan, x0, s, EDGES, fit=halves(40))
    with pytest.raises(ValueError, match="sigma"):
        calibration_by_sigma(mu, V, x0, torch.zeros(40), EDGES, fit=halves(40))


def test_paired_models_are_scored_on_their_own_errors_and_common_elements():
    """A baseline given as (mu_b, var_b), another model's own mean and variance for the same x0, is scored
    against its own error; rest="common" keeps only the elements that no predictor floors. Checked against
    the per-element Gaussian NLL written out (to 1e-9) and against its expectation: a mean off by
    δ = 0.3·√V with the exact V costs ½·0.09 = 0.045 nats per element (within 4 bootstrap sd).
    Breakages tried: the baseline scored against the head's error (gain 0 instead of 0.045) and
    rest="common" ignoring the baselines (the rest count differs): each fails here."""
    mu, V, x0, sigma, _ = gaussian(n=300, d=200)
    mu_b = mu + 0.3 * V.sqrt()
    off = torch.rand(V.shape, generator=torch.Generator().manual_seed(4)) < 0.1
    var_b = torch.where(off, torch.zeros_like(V), V)          # 10% of b's elements floored
    nll = lambda m, v: 0.5 * torch.log(2 * math.pi * v) + 0.5 * (m - x0) ** 2 / v  # noqa: E731
    d = nll(mu_b, var_b) - nll(mu, V)
    out = readout(mu, V, x0, sigma, baselines={"b": (mu_b, var_b)}, rest="common")
    for row in out["bins"].values():
        m = eval_mask(sigma, row["sigma_lo"], row["sigma_hi"])[:, None].expand_as(V)
        keep = m & ~off
        assert row["rest"] == int(keep.sum())
        g = row["gain"]["b"]
        assert g["nll"] == pytest.approx(float(d[keep].mean()), rel=1e-9)
        assert abs(g["nll"] - 0.045) < 4 * g["nll_sd"] and g["verdict"] == "head better"
        assert row["b"]["floored_share"] == pytest.approx(float(off[m].double().mean()), rel=1e-12)
    head_rest = readout(mu, V, x0, sigma, baselines={"b": (mu_b, var_b)})        # rest="head": all kept here
    for row in head_rest["bins"].values():
        assert row["rest"] == row["elements"]
    with pytest.raises(ValueError, match="rest"):
        readout(mu, V, x0, sigma, rest="both")


def _oracle_bench():
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "oracle_coverage", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "oracle_coverage.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_pixel_oracle_posterior_has_the_two_level_closed_form():
    """benchmarks/oracle_coverage.py --data mnist: per pixel p(x0 = v_k | x̃) ∝ h_k N(x̃; v_k, σ²). A pixel
    that is −1 w.p. 0.9 and +1 w.p. 0.1: P(+1 | x̃) = sigmoid(log(0.1/0.9) + 2x̃/σ²), mean 2P − 1, variance
    4P(1 − P); a pixel that is always one value has variance 0. pixel_marginals counts byte values per pixel.
    Breakage tried: the likelihood without the ½ (exp(−(x̃ − v)²/σ²)) → this test."""
    bench = _oracle_bench()
    imgs = np.zeros((10, 1, 1, 2), dtype=np.uint8)
    imgs[0, 0, 0, 0] = 255                                 # pixel 0: one image in ten is ink; pixel 1 never
    freq = bench.pixel_marginals(imgs)
    assert freq.shape == (2, 256) and freq[0, 0] == 0.9 and freq[0, 255] == 0.1 and freq[1, 0] == 1.0
    sigma = 0.7
    xn = torch.tensor([[-1.3, 0.2], [0.4, -0.9], [1.5, 3.0]], dtype=F64)
    mean, var = bench.pixel_posterior(freq, xn, sigma)
    p = torch.sigmoid(math.log(0.1 / 0.9) + 2 * xn[:, 0] / sigma ** 2)
    assert torch.allclose(mean[:, 0], 2 * p - 1, atol=1e-12) and torch.allclose(var[:, 0], 4 * p * (1 - p),
                                                                                atol=1e-12)
    assert torch.all(mean[:, 1] == -1) and torch.all(var[:, 1] == 0)


def test_the_trees_exact_posterior_has_unit_z2_and_near_gaussian_coverage():
    """benchmarks/oracle_coverage.py: the tree's exact posterior (mean, diagonal variance) read through the
    readout. T8's optimum has E[(x0 − μ*)²/Var] = 1 per element, so z2_mean is 1 within its sampling error
    (a posterior without the between-component term, or the covariance's full trace per element, misses it);
    its coverage is the posterior's shape (measured 70–72% / 94–96% at 4096 points per σ, BENCHMARKS)."""
    out = _oracle_bench().exact_coverage([0.1, 1.0], points=2048, seed=0)
    for b in out["bins"].values():
        h = b["head"]
        assert abs(h["z2_mean"] - 1) < 0.15, h["z2_mean"]            # sd ≈ √(2/2048) per element × √2 dims
        assert 0.6 < h["coverage_1s"] < 0.8 and 0.9 < h["coverage_2s"] < 0.99, h


def test_rescaled_coverage_has_the_closed_forms():
    """rescale_coverage: C1(c) = P(z² ≤ c), C2(c) = P(z² ≤ 4c). Gaussian z: the window of c is where both
    χ²₁ probabilities are in the band, [max(q(.63), q(.92)/4), min(q(.73), q(.98)/4)]; Laplace(1) z:
    C1 = 1 − e^{−√c}, C2 = 1 − (1 − C1)², window C1 ∈ [1 − √0.08, 0.73], kurtosis 6; a calibrated two-point z
    (err 0.2 w.p. 0.9, 1.8 w.p. 0.1, var 0.36: a pixel that is ink with probability 0.1) has no window,
    its best miss is max(|0.9 − 0.68|/0.05, |0.9 − 0.95|/0.03) = 4.4 and its kurtosis 8.111."""
    from scipy.stats import chi2
    (lo1, hi1), (lo2, hi2) = COVERAGE_TARGET
    n = 400_000
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, generator=g, dtype=F64).numpy()
    r = rescale_coverage(z ** 2)
    lo, hi = max(chi2.ppf(lo1, 1), chi2.ppf(lo2, 1) / 4), min(chi2.ppf(hi1, 1), chi2.ppf(hi2, 1) / 4)
    assert r["feasible"] and r["scale_lo"] == pytest.approx(lo, rel=0.02) and r["scale_hi"] == pytest.approx(
        hi, rel=0.02), (r, lo, hi)
    assert r["kurtosis"] == pytest.approx(3, abs=0.05) and r["best"]["miss"] < 0.2
    lap = torch.empty(n, dtype=F64).exponential_(generator=g).numpy()     # |z| of a Laplace(1): Exp(1)
    r = rescale_coverage(lap ** 2)
    lo, hi = math.log(1 / math.sqrt(1 - lo2)) ** 2, math.log(1 / (1 - hi1)) ** 2   # 1.595, 1.714
    assert r["feasible"] and r["scale_lo"] == pytest.approx(lo, rel=0.02) and r["scale_hi"] == pytest.approx(
        hi, rel=0.02), (r, lo, hi)
    assert r["kurtosis"] == pytest.approx(6, rel=0.05)
    two = np.array([0.2 ** 2 / 0.36] * 90 + [1.8 ** 2 / 0.36] * 10)
    assert two.mean() == pytest.approx(1)                                            # calibrated in scale
    r = rescale_coverage(two)
    assert not r["feasible"] and r["scale_lo"] is None and r["scale_hi"] is None
    assert r["best"]["coverage_1s"] == pytest.approx(0.9) and r["best"]["miss"] == pytest.approx(4.4)
    assert r["kurtosis"] == pytest.approx((0.9 / 81 + 0.1 * 81) / 1.0, rel=1e-9)
    # a window that only the z²/4 step points find: c ∈ [0.25, 1) gives C1 = 65%, C2 = 93%
    steps = np.array([0.1] * 65 + [1.0] * 28 + [100.0] * 7)
    r = rescale_coverage(steps)
    assert r["feasible"] and r["scale_lo"] == 0.25 and r["best"]["coverage_1s"] == pytest.approx(0.65)
    for bad in ([], [1.0, -0.5], [float("nan")]):
        with pytest.raises(ValueError, match="z2"):
            rescale_coverage(bad)


def test_variance_scale_recovers_a_doubled_variance():
    """A head that claims 2V for an exact Gaussian posterior V: the NLL's optimal scale is E[z²] = 1/2; the
    coverage scale is the geometric middle of the Gaussian window halved, √(lo·hi)/2 with lo, hi from the χ²₁
    quantiles of the band (test_rescaled_coverage_has_the_closed_forms). Elements at or below the floor
    (here var = 0 with a large error) are left out of both fits."""
    from scipy.stats import chi2
    (lo1, hi1), (lo2, hi2) = COVERAGE_TARGET
    g = torch.Generator().manual_seed(1)
    n = 200_000
    V = torch.empty(n, dtype=F64).uniform_(0.01, 1.0, generator=g).numpy()
    err2 = V * torch.randn(n, generator=g, dtype=F64).numpy() ** 2
    err2, var = np.concatenate([err2, np.full(1000, 50.0)]), np.concatenate([2 * V, np.zeros(1000)])
    assert fit_variance_scale(err2, var, "nll", floor_var=1e-12) == pytest.approx(0.5, rel=0.01)
    lo, hi = max(chi2.ppf(lo1, 1), chi2.ppf(lo2, 1) / 4), min(chi2.ppf(hi1, 1), chi2.ppf(hi2, 1) / 4)
    assert fit_variance_scale(err2, var, "coverage", floor_var=1e-12) == pytest.approx(
        math.sqrt(lo * hi) / 2, rel=0.02)
    two = np.array([0.04] * 90 + [3.24] * 10)          # no window: the closest scale (rescale_coverage)
    assert fit_variance_scale(two, np.full(100, 0.36), "coverage") == rescale_coverage(two / 0.36)["best"][
        "scale"]
    with pytest.raises(ValueError, match="how"):
        fit_variance_scale(err2, var, "median")
    with pytest.raises(ValueError, match="no element above the floor"):
        fit_variance_scale([1.0], [0.0], "nll", floor_var=0.0)


def test_recalibration_is_fitted_on_the_fit_half_only():
    """images._recalibrated (gendiff eval --calibration-against … --recalibrate): per σ one scale from the
    images that fit the constant (even indices); the measured images' errors must not move it."""
    from gendiff.experiments.images import _recalibrated
    n, d, sigmas = 8, 50, (0.1, 1.0)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(n, d, generator=g)
    mu = x0.repeat(2, 1) + 0.3 * torch.randn(2 * n, d, generator=g)
    var = torch.full((2 * n, d), 0.09, dtype=F64)
    (_, v1), m1 = _recalibrated(x0, sigmas, (mu, var), "nll")
    spoiled = mu.clone()
    spoiled[1::2] += 10.0                                  # the measured (odd) images' errors, at both σ
    (_, v2), m2 = _recalibrated(x0, sigmas, (spoiled, var), "nll")
    assert m1 == m2 and torch.equal(v1, v2)
    for k, m in enumerate(m1):
        assert m["edges"] == [] and len(m["scales"]) == 1
        c = m["scales"][0]
        fit = (mu[k * n:(k + 1) * n].double() - x0.double())[::2]
        assert c == pytest.approx(float(fit.square().mean()) / 0.09, rel=1e-9)
        assert torch.allclose(v1[k * n:(k + 1) * n], var[k * n:(k + 1) * n] * c)


def test_grouped_scale_undoes_two_different_misscalings():
    """A head that claims 2V where V is small and V/2 where V is large (exact Gaussian errors): one scalar
    cannot fix both (its NLL optimum is the mean z², 1.25); two quantile groups of the claimed variance
    recover 1/2 and 2 (NLL) and put each group's coverage at the Gaussian's. The map multiplies each claim by
    its own group's scale."""
    g = torch.Generator().manual_seed(3)
    n = 100_000
    V = torch.cat([torch.empty(n, dtype=F64).uniform_(0.01, 0.02, generator=g),
                   torch.empty(n, dtype=F64).uniform_(1.0, 2.0, generator=g)]).numpy()
    claim = np.concatenate([2 * V[:n], V[n:] / 2])
    err2 = V * torch.randn(2 * n, generator=g, dtype=F64).numpy() ** 2
    one = VarianceScale.fit(err2, claim, "nll")
    assert one.edges == () and one.scales[0] == pytest.approx(1.25, rel=0.02)
    two = VarianceScale.fit(err2, claim, "nll", groups=2)
    assert len(two.edges) == 1 and 0.04 <= two.edges[0] <= 0.5
    assert two.scales == pytest.approx((0.5, 2.0), rel=0.02)
    fixed = two(claim)
    np.testing.assert_allclose(fixed, np.concatenate([claim[:n] * two.scales[0], claim[n:] * two.scales[1]]))
    z2 = err2 / fixed
    assert abs((z2 <= 1).mean() - GAUSS_COVERAGE_1) < 0.01 and abs((z2 <= 4).mean() - GAUSS_COVERAGE_2) < 0.01
    cov = VarianceScale.fit(err2, claim, "coverage", groups=2)
    z2 = err2 / cov(claim)
    (lo1, hi1), (lo2, hi2) = COVERAGE_TARGET
    assert lo1 <= (z2 <= 1).mean() <= hi1 and lo2 <= (z2 <= 4).mean() <= hi2
    flat = VarianceScale.fit(err2, np.full(2 * n, 0.3), "nll", groups=4)   # one value: one group
    assert flat.edges == () and flat.scales[0] == pytest.approx(err2.mean() / 0.3)
    two_values = VarianceScale.fit(np.ones(100), np.repeat([1.0, 2.0], 50), "nll", groups=4)
    assert two_values.edges == (2.0,) and two_values.scales == pytest.approx((1.0, 0.5))
    with pytest.raises(ValueError, match="groups=5"):
        VarianceScale.fit([1.0, 2.0], [1.0, 1.0], "nll", groups=5)
