"""Calibration of a predicted Var[x0 | x̃] per σ bin, against the best σ-only predictor (THEORY T7, T8).

A confidence head's σ_φ² models the noisy sample x ~ N(x0, σ²), so its optimum is σ_φ² = σ² + Var[x0 | x̃]
(T8) and the error bar it gives μ as an estimate of x0 is the excess var_x0 = σ_φ² − σ², which a trained head
can push to or below 0. `calibration_by_sigma` scores var_x0 without letting those elements set the numbers:
they are counted apart (the floored share), every other number is on the rest, and the NLL with the floor
applied to every element is reported beside it under its own name. The yardstick is the best constant per σ
bin, fitted on a separate split of the examples."""
from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from scipy.stats import spearmanr

from .checks import as_sigma, check_choice, check_positive
from .io import save_figure

GAUSS_COVERAGE_1, GAUSS_COVERAGE_2 = math.erf(1 / math.sqrt(2)), math.erf(2 / math.sqrt(2))   # 0.6827, 0.9545
FLOOR = 1e-3        # an element is floored where var_x0 ≤ (FLOOR·σ)²: a std of x0 under 0.1% of the noise std
DECILES = 10        # reliability table: predicted variance in this many equal-count groups
BOOT = 200          # bootstrap resamples of the examples for the sd of an NLL difference
VERDICT_SD = 2.0    # a difference is resolved when |difference| > VERDICT_SD · its bootstrap sd
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# issue 18's coverage target per σ bin: ±1 std within 68 ± 5%, ±2 std within 95 ± 3%
COVERAGE_TARGET = ((0.63, 0.73), (0.92, 0.98))


def _f64(t, shape, name: str) -> np.ndarray:
    t = torch.as_tensor(t).detach().to("cpu", torch.float64)
    try:
        return torch.broadcast_to(t, shape).numpy()
    except RuntimeError:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, which does not broadcast to mu's "
                         f"{tuple(shape)}") from None


def _score(var: np.ndarray, err2: np.ndarray, floor_var: np.ndarray,
           rest: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """One predictor on one bin's evaluation elements: (its readout, its per-element NLL with the floor
    applied, z² = err2/var on `rest`). Coverage, NLL, Spearman and the reliability table are on `rest` (the
    head's unfloored elements, or those no predictor floors); var is clamped at the floor, which changes
    nothing on `rest` for the head itself."""
    v = np.maximum(var, floor_var)
    nll = _HALF_LOG_2PI + 0.5 * np.log(v) + 0.5 * err2 / v      # −log N(x0; μ, v) per element (nats)
    out = {"floored_share": float((var <= floor_var).mean()), "nll": None, "coverage_1s": None,
           "coverage_2s": None, "z2_mean": None, "rescaled": None, "spearman": None, "reliability": None,
           "nll_floored_all": float(nll.mean())}
    z2 = err2[rest] / v[rest]
    if rest.any():
        vr, er = v[rest], err2[rest]
        out.update(nll=float(nll[rest].mean()), coverage_1s=float((z2 <= 1).mean()),
                   coverage_2s=float((z2 <= 4).mean()), z2_mean=float(z2.mean()),
                   rescaled=rescale_coverage(z2))
        if vr.min() < vr.max():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # constant errors: nan, kept as such
                out["spearman"] = float(spearmanr(vr, er).statistic)   # std vs |μ − x0|: same ranks
        groups = [g for g in np.array_split(np.argsort(vr, kind="stable"), DECILES) if len(g)]
        out["reliability"] = {"mean_var": [float(vr[g].mean()) for g in groups],
                              "mse": [float(er[g].mean()) for g in groups], "n": [len(g) for g in groups]}
    return out, nll, z2


def rescale_coverage(z2, target=COVERAGE_TARGET) -> dict:
    """Could one scalar per σ bin fix a predictor's coverage? z2: (μ − x0)²/var per element of one bin.
    Scaling var by c turns the ±1 / ±2 std coverage into C1(c) = P(z² ≤ c) and C2(c) = P(z² ≤ 4c): both
    move with c, but their pair is set by the shape of the z distribution, not its scale. A Gaussian z (any
    calibrated Gaussian predictive) reaches 68.3% / 95.4% at c = 1; a heavy-tailed z only in a narrow window
    (Laplace: C2 = 1 − (1 − C1)², so C1 = 68% gives C2 = 90% and only C1 ∈ [71.7%, 73%] is inside), and a
    two-point one (a pixel that is ink or background) at no c.
    Returns feasible (some c puts both inside target), scale_lo / scale_hi (the smallest and largest such c
    among the step points z²_i, z²_i/4, None if none; the window runs on to the next step point), best (the
    c minimising the larger of the two misses, each in units of its band's half width, with its
    coverage_1s, coverage_2s and miss: ≤ 1 inside), and kurtosis E[z⁴]/E[z²]² of the signed
    z (3 for a Gaussian). Exact: C1 and C2 are step functions of c that change only at the z²_i and z²_i/4,
    so every c that matters is one of those."""
    z2 = np.sort(np.asarray(z2, dtype=np.float64).ravel())
    if not len(z2) or not np.isfinite(z2).all() or (z2 < 0).any():
        raise ValueError(f"z2 has {len(z2)} elements; allowed: one or more finite values >= 0")
    (lo1, hi1), (lo2, hi2) = target
    cand = np.unique(np.concatenate([z2, z2 / 4]))
    c1 = np.searchsorted(z2, cand, side="right") / len(z2)
    c2 = np.searchsorted(z2, 4 * cand, side="right") / len(z2)
    miss = np.maximum(np.abs(c1 - (lo1 + hi1) / 2) / ((hi1 - lo1) / 2),
                      np.abs(c2 - (lo2 + hi2) / 2) / ((hi2 - lo2) / 2))
    ok = miss <= 1
    b = int(np.argmin(miss))
    return {"feasible": bool(ok.any()), "scale_lo": float(cand[ok].min()) if ok.any() else None,
            "scale_hi": float(cand[ok].max()) if ok.any() else None,
            "best": {"scale": float(cand[b]), "coverage_1s": float(c1[b]), "coverage_2s": float(c2[b]),
                     "miss": float(miss[b])},
            "kurtosis": float(np.mean(z2 ** 2) / np.mean(z2) ** 2) if z2.any() else None}


RECALIBRATIONS = ("nll", "coverage")


def fit_variance_scale(err2, var, how: str, floor_var=0.0) -> float:
    """One scalar c for a predicted variance (var → c·var), fitted on one σ bin's held-out elements (err2 =
    (μ − x0)², var; those with var ≤ floor_var are left out). how="nll": c = mean z², the Gaussian NLL's
    optimum over c (σ scaling: Levi et al. 2019, "Evaluating and calibrating uncertainty prediction in
    regression tasks"); how="coverage": the geometric middle of rescale_coverage's window (both coverages
    inside issue 18's band), or its closest c where there is none. One scalar keeps the ranks of var (its
    Spearman and reliability groups); VarianceScale's groups each get their own, which can reorder them."""
    check_choice("how", how, RECALIBRATIONS)
    err2, var = np.asarray(err2, dtype=np.float64).ravel(), np.asarray(var, dtype=np.float64).ravel()
    keep = var > floor_var
    if not keep.any():
        raise ValueError("fit_variance_scale: no element above the floor to fit on")
    z2 = err2[keep] / var[keep]
    if how == "nll":
        return float(z2.mean())
    r = rescale_coverage(z2)
    return math.sqrt(r["scale_lo"] * r["scale_hi"]) if r["feasible"] else r["best"]["scale"]


@dataclass(frozen=True)
class VarianceScale:
    """A post-hoc recalibration of one σ bin's predicted variance: var → scales[g]·var, g the group of var
    among `edges` (the quantiles of the variances it was fitted on; one group: a single scalar). With
    several groups the map can undo a head whose small and large claims are off by different factors, which
    one scalar cannot; within a group the ranks are kept, across groups they need not be (nothing makes the
    map monotone)."""
    edges: tuple = ()
    scales: tuple = (1.0,)

    def __call__(self, var):
        var = np.asarray(var, dtype=np.float64)
        return var * np.asarray(self.scales)[np.searchsorted(self.edges, var, side="right")]

    @classmethod
    def fit(cls, err2, var, how: str, floor_var=0.0, groups: int = 1) -> "VarianceScale":
        """Fitted on held-out (err2, var) of one bin: the elements above floor_var split into `groups`
        equal-count groups by var, each with its fit_variance_scale. Tied variances stay in one group, so a
        predictor with few distinct values (a σ-only one: one value) gets fewer groups."""
        check_positive("groups", groups, integer=True)
        err2, var = np.asarray(err2, dtype=np.float64).ravel(), np.asarray(var, dtype=np.float64).ravel()
        keep = var > floor_var
        if keep.sum() < groups:
            raise ValueError(f"groups={groups}; allowed: at most the {int(keep.sum())} elements above the "
                             "floor")
        q = np.unique(np.quantile(var[keep], np.arange(1, groups) / groups))
        filled = np.unique(np.searchsorted(q, var[keep], side="right"))
        edges = tuple(float(q[j - 1]) for j in filled[1:])    # drop the edges of empty groups (ties)
        g = np.searchsorted(edges, var, side="right")
        return cls(edges, tuple(fit_variance_scale(err2[g == k], var[g == k], how, floor_var)
                                for k in range(len(edges) + 1)))


def _boot(diff: np.ndarray, example: np.ndarray, rng, boot: int) -> tuple[float, float]:
    """Mean of `diff` over elements and its bootstrap sd, resampling examples (an example's elements stay
    together: pixels of one image are correlated)."""
    ids, inv = np.unique(example, return_inverse=True)
    s, c = np.bincount(inv, weights=diff), np.bincount(inv).astype(np.float64)
    idx = rng.integers(0, len(ids), (boot, len(ids)))
    resampled = s[idx].sum(1) / c[idx].sum(1)
    return float(s.sum() / c.sum()), float(resampled.std(ddof=1)) if len(ids) > 1 else math.nan


def _verdict(gain: float, sd: float) -> str:
    if not math.isfinite(sd) or abs(gain) <= VERDICT_SD * sd:
        return "not resolved"
    return "head better" if gain > 0 else "baseline better"


def calibration_by_sigma(mu, var_x0, x0, sigma, bins, *, fit, baselines=None, labels=None,
                         floor: float = FLOOR, min_examples: int = 1, boot: int = BOOT,
                         seed: int = 0, rest: str = "head") -> dict:
    """Per σ bin, a predicted Var[x0 | x̃] (`var_x0`, "the head") scored against the error of μ, beside the
    best constant per bin and any further predictors.

    mu, x0: [N, ...] (one shape; N examples); var_x0 and each baseline broadcast to mu (any value, ≤ 0
    included); a baseline may also be a pair (mu_b, var_b): another model's own mean and variance for the
    same x0 from the same noisy inputs, scored against its own error (mu_b − x0)² — a paired comparison
    of two models; sigma: the noise level, one per example [N] or per element (checks.as_sigma); bins:
    increasing edges, bin k is [bins[k], bins[k + 1]) (labels: one name per bin, default "[lo, hi)");
    fit: bool [N], the examples on which the constant is fitted. Everything else is measured on the other
    examples only (the evaluation split); a bin with no fit element or fewer than `min_examples` evaluation
    examples is left out.

    Floor: an element is floored where var_x0 ≤ (floor·σ)², i.e. the head claims x0 to better than
    floor·σ (default 0.1% of the noise std). Tied to σ because var_x0 is read as σ_φ² − σ²: a float32 σ_φ²
    resolves an excess only down to about 1.2e-7·σ² (one ulp), so the default floor, 1e-6·σ², sits a few
    ulps above round-off; below it the number is not a claim the head can make.

    Per bin (`bins[label]`): sigma_lo, sigma_hi; examples and elements of the evaluation split in the bin;
    rest: the elements the head does not floor, or with rest="common" the elements that neither the head
    nor any baseline floors (compare models on the same elements: a model that floors its hardest elements
    would otherwise be scored on an easier set); per predictor ("head", "constant", each baseline name):
    - floored_share: its own share of elements with var ≤ floor (the constant's is 0 unless the bin's error
      is below the floor);
    - on the rest, with the predictor's var clamped at the floor: nll, the mean −log N(x0; μ, var)
      per element (nats); coverage_1s / coverage_2s, the shares with |μ − x0| ≤ √var and ≤ 2√var (Gaussian
      68.27% / 95.45%; above: var too large) and their bootstrap sd over examples (coverage_1s_sd,
      coverage_2s_sd); z2_mean, mean (μ − x0)²/var (ideal 1); rescaled,
      rescale_coverage of those z²: whether one scalar on var could bring both coverages inside issue 18's
      band (if not, the shape of the errors given var is off, not its scale); spearman, the rank
      correlation of √var with |μ − x0| (None for a predictor constant there); reliability, the rest split
      into `DECILES` equal-count groups by var: mean_var, mse (mean (μ − x0)²) and n per group (calibrated:
      mse ≈ mean_var);
    - nll_floored_all: the NLL over all the bin's evaluation elements, var clamped at the floor (the floored
      elements included: floor-dominated when the floored share is not small).
    "constant" also has var: the mean of (μ − x0)² over the bin's fit-split elements (all of them; a σ-only
    predictor cannot know which elements the head floors), the best constant variance under Gaussian NLL.
    gain[name] for "constant" and each baseline: nll and nll_floored_all of the baseline minus the head's
    (nats/element, > 0: the head is better), each with its sd (`_sd`) from `boot` bootstrap resamples of the
    evaluation examples, and verdict: "head better", "baseline better" or "not resolved" (|gain| ≤
    VERDICT_SD·sd), for the NLL on the rest.
    Top level: floor, examples_fit, examples_eval, bootstrap, and bins."""
    mu_t = torch.as_tensor(mu).detach().to("cpu", torch.float64)
    x0_t = torch.as_tensor(x0).detach().to("cpu", torch.float64)
    if mu_t.shape != x0_t.shape or mu_t.ndim < 1 or not len(mu_t):
        raise ValueError(f"mu has shape {tuple(mu_t.shape)} and x0 {tuple(x0_t.shape)}; allowed: one shape "
                         "[N >= 1, ...]")
    shape, n = mu_t.shape, len(mu_t)
    check_positive("floor", floor)
    check_positive("min_examples", min_examples, integer=True)
    check_positive("boot", boot, integer=True)
    edges = [float(e) for e in bins]
    if len(edges) < 2 or any(not a < b for a, b in pairwise(edges)) or edges[0] < 0:
        raise ValueError(f"bins={edges}; allowed: two or more increasing edges >= 0")
    labels = [f"[{a:.3g}, {b:.3g})" for a, b in pairwise(edges)] if labels is None else list(labels)
    if len(labels) != len(edges) - 1 or len(set(labels)) != len(labels):
        raise ValueError(f"labels={labels}; allowed: {len(edges) - 1} distinct names, one per bin")
    fit = torch.as_tensor(fit).detach().cpu()
    if fit.dtype != torch.bool or fit.shape != (n,):
        raise ValueError(f"fit has dtype {fit.dtype} and shape {tuple(fit.shape)}; allowed: bool [{n}], True "
                         "for the examples the constant is fitted on")
    check_choice("rest", rest, ("head", "common"))
    baselines = dict(baselines or {})
    for name in ("head", "constant", "gain", "sigma_lo", "sigma_hi", "examples", "elements", "rest"):
        if name in baselines:
            raise ValueError(f"baselines has a predictor named {name!r}; that name is taken")
    own_mu = {k: v[0] for k, v in baselines.items() if isinstance(v, tuple)}
    baselines = {k: v[1] if isinstance(v, tuple) else v for k, v in baselines.items()}
    preds = {"head": _f64(var_x0, shape, "var_x0"),
             **{k: _f64(v, shape, f"baselines[{k!r}]") for k, v in baselines.items()}}
    for k, v in preds.items():
        if not np.isfinite(v).all():
            raise ValueError(f"the variance of {k!r} is not finite everywhere; allowed: finite values")
    s = torch.broadcast_to(as_sigma(sigma, mu_t), shape).numpy().reshape(n, -1)
    err2 = ((mu_t - x0_t).square()).numpy().reshape(n, -1)
    errs = {k: ((torch.as_tensor(_f64(m, shape, f"baselines[{k!r}] mean")) - x0_t).square()).numpy()
            .reshape(n, -1) for k, m in own_mu.items()}
    if not all(np.isfinite(e).all() for e in (err2, *errs.values())):
        raise ValueError("mu − x0 is not finite everywhere; allowed: finite mu and x0")
    preds = {k: v.reshape(n, -1) for k, v in preds.items()}
    example = np.broadcast_to(np.arange(n)[:, None], err2.shape)
    is_fit = np.broadcast_to(fit.numpy()[:, None], err2.shape)
    which = np.searchsorted(edges, s, side="right") - 1
    floor_var = (floor * s) ** 2
    out = {"floor": floor, "examples_fit": int(fit.sum()), "examples_eval": int((~fit).sum()),
           "bootstrap": boot, "bins": {}}
    for k, label in enumerate(labels):
        inb = which == k
        f_el, e_el = inb & is_fit, inb & ~is_fit
        ex = example[e_el]
        if not f_el.any() or len(np.unique(ex)) < min_examples:
            continue
        e2, fv = err2[e_el], floor_var[e_el]
        const = float(err2[f_el].mean())
        rest_of = preds if rest == "common" else {"head": preds["head"]}
        kept = np.logical_and.reduce([v[e_el] > fv for v in rest_of.values()])
        row = {"sigma_lo": edges[k], "sigma_hi": edges[k + 1], "examples": len(np.unique(ex)),
               "elements": int(e_el.sum()), "rest": int(kept.sum())}
        nll = {}
        for name, v in (("head", preds["head"][e_el]), ("constant", np.full(e2.shape, const)),
                        *((b, preds[b][e_el]) for b in baselines)):
            row[name], nll[name], z2 = _score(v, errs[name][e_el] if name in errs else e2, fv, kept)
            if kept.any():                       # coverage's sd: its own stream per (bin, predictor)
                rng = np.random.default_rng([seed, k, zlib.crc32(name.encode()), 1])
                for key, bound in (("coverage_1s_sd", 1.0), ("coverage_2s_sd", 4.0)):
                    row[name][key] = _boot((z2 <= bound).astype(np.float64), ex[kept], rng, boot)[1]
        row["constant"]["var"] = const
        row["gain"] = {}
        for name, base in nll.items():
            if name == "head":
                continue
            g = {}
            d = base - nll["head"]
            # its own stream per (bin, baseline): adding a baseline leaves the other sds as they were
            rng = np.random.default_rng([seed, k, zlib.crc32(name.encode())])
            g["nll"], g["nll_sd"] = _boot(d[kept], ex[kept], rng, boot) if kept.any() else (None, None)
            g["nll_floored_all"], g["nll_floored_all_sd"] = _boot(d, ex, rng, boot)
            g["verdict"] = _verdict(g["nll"], g["nll_sd"]) if kept.any() else "not resolved"
            row["gain"][name] = g
        out["bins"][label] = row
    return out


def reliability_figure(path: str, readout: dict, title: str = "") -> None:
    """A PNG: one panel per σ bin of a `calibration_by_sigma` readout, mean squared error of μ against the
    mean predicted Var[x0 | x̃] per decile (log–log; calibrated on the diagonal) for the head and each
    further predictor, the constant as one point; each panel names its floored share and the head's NLL gain
    over the constant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = readout["bins"]
    if not bins:
        raise ValueError("the readout has no σ bin to draw")
    fig, axes = plt.subplots(1, len(bins), figsize=(3.0 * len(bins), 3.2), squeeze=False)
    try:
        for ax, (label, row) in zip(axes[0], bins.items()):
            names = [k for k in row if isinstance(row[k], dict) and "reliability" in row[k]]
            pts = []
            for i, name in enumerate(names):
                rel = row[name]["reliability"]
                if rel is None:
                    continue
                if name == "constant":
                    x, y = [row[name]["var"]], [float(np.average(rel["mse"], weights=rel["n"]))]
                    ax.plot(x, y, "s", color="k", ms=6, label="best constant")
                else:
                    x, y = rel["mean_var"], rel["mse"]
                    ax.plot(x, y, "o-", ms=3, color=f"C{i}", label=name)
                pts += [v for v in (*x, *y) if v > 0]
            ax.set_xscale("log"), ax.set_yscale("log")
            if pts:
                lo, hi = min(pts) / 1.5, max(pts) * 1.5
                ax.plot([lo, hi], [lo, hi], ":", color="grey", lw=1)
                ax.set_xlim(lo, hi), ax.set_ylim(lo, hi)
                ticks = np.geomspace(lo * 1.2, hi / 1.2, 4)   # four labelled ticks, whatever the range
                ax.minorticks_off()
                ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
                ax.set_yticks(ticks, [f"{t:.2g}" for t in ticks])
            g = row["gain"]["constant"]
            gain = "–" if g["nll"] is None else f"{g['nll']:+.4f} ± {g['nll_sd']:.4f}"
            name = f"σ = {label[6:]}" if label.startswith("sigma=") else f"σ ∈ {label}"
            ax.set_title(f"{name}\nfloored {100 * row['head']['floored_share']:.2f}%, "
                         f"NLL gain {gain}", fontsize=8)
            ax.set_xlabel("predicted Var[x0 | x̃] (decile mean)", fontsize=7)
            ax.tick_params(labelsize=6)
        axes[0, 0].set_ylabel("mean (μ − x0)²", fontsize=7)
        axes[0, 0].legend(fontsize=6)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)
