"""Results of `gendiff ablate`: metrics.json, metrics.md (best per column in bold) and figures."""
from __future__ import annotations

import json
import math
import os

import torch

from ..heads import make_head
from ..io import save_figure, save_json, save_text
from ..mixture_metrics import CAL_BIN_DECADES, CAL_MIN_POINTS

COLUMNS = [  # path, header, better ("min", "max", "zero" for closest to 0, None: no bold)
    (("sample_nll",), "sample NLL ↓", "min"),
    (("median_nll",), "median NLL ↓", "min"),
    (("outlier_rate",), "outliers ↓", "min"),
    (("mmd",), "MMD² ↓", "zero"),
    (("nonfinite",), "diverged ↓", "min"),
    (("score_error",), "score error ↓", "min"),
    (("nfe",), "NFE", None),
    (("sample_s",), "sampling s", None),
]
CAL_COLUMNS = [
    (("calibration", "spearman"), "total Spearman ↑", "max"),
    (("calibration", "spearman_excess"), "excess Spearman in σ bins ↑", "max"),
    (("calibration", "partial_spearman_excess"), "excess partial Spearman given σ ↑", "max"),
    (("calibration", "median_rel_error_excess"), "excess med. rel. err ↓", "min"),
    (("calibration", "p90_rel_error_excess"), "excess p90 rel. err ↓", "min"),
    (("calibration", "ratio"), "ratio (1 = calibrated)", "one"),
]
GUIDANCE_COLUMNS = [
    (("mmd_change",), "MMD² change", None),
    (("mmd_ratio_of_means",), "MMD² ratio (of means)", None),
    (("outlier_change",), "outliers, relative change", None),
    (("sample_nll_change",), "sample NLL change", None),
    (("median_nll_change",), "median NLL change", None),
]


def _get(m: dict, path: tuple):
    for part in path:
        if not isinstance(m, dict) or part not in m:
            return None
        m = m[part]
    return m


def metrics_rows(result: dict):
    rows = []
    for name, ref in result.get("reference", {}).items():
        rows.append((f"*{name}* (reference)", "–", ref))
    for name, per in result["runs"].items():
        for label, m in per.items():
            t = result.get("timings", {}).get("runs", {}).get(name, {})  # absent in seed summaries
            rows.append((name, label, {**m, "sample_s": t.get(f"sample_s_{label}")}))
    return rows


def _center(v):
    """A cell's value to rank by: the number, or the mean of a multi-seed {"mean", "std"} summary."""
    return v["mean"] if isinstance(v, dict) else v


def _cell(v) -> str:
    if v is None or (isinstance(v, dict) and v.get("mean") is None):
        return "–"
    if isinstance(v, dict):
        return f"{_fmt(v['mean'])} ± {_fmt(v['std'])}"
    return f"{v:d}" if isinstance(v, int) else _fmt(v)


def _pick(better, vals):
    return {"min": min, "max": max, "zero": lambda v: min(v, key=abs),
            "one": lambda v: min(v, key=lambda u: abs(u - 1))}[better](vals)


def table(rows, columns, hide_empty: bool = True) -> str:
    """A markdown table of (name, label, metrics) rows; the best model value per column in bold."""
    def shown(path):  # a column only if some row has it; "diverged" only when something diverged
        vals = [_center(_get(m, path)) for _, _, m in rows]
        return any(v is not None for v in vals) and (path != ("nonfinite",) or any(v for v in vals))
    cols = [c for c in columns if shown(c[0]) or not hide_empty]
    best = {}
    for path, _, better in cols:
        vals = [_center(_get(m, path)) for name, _, m in rows if not name.endswith("(reference)")]
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if vals and better:
            best[path] = _pick(better, vals)
    lines = ["| run | guidance | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name, label, m in rows:
        cells = []
        for path, _, _ in cols:
            v = _get(m, path)
            c = _cell(v)
            if c != "–" and path in best and _center(v) == best[path] and not name.endswith("(reference)"):
                c = f"**{c}**"
            cells.append(c)
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def metrics_markdown(result: dict) -> str:
    """The main table: sample metrics and score error of every run and reference."""
    return table([r for r in metrics_rows(result) if _get(r[2], ("nfe",)) is not None], COLUMNS)


def calibration_markdown(result: dict) -> str:
    """Calibration of σ_φ (runs with it, the no-head EDM models as the σ-alone baseline, the exact oracle),
    plus the calibration ratio per σ range."""
    rows = [r for r in metrics_rows(result) if _get(r[2], ("calibration",)) is not None]
    if not rows:
        return ""
    bins = list(_get(rows[0][2], ("calibration", "ratio_by_sigma")))
    cols = CAL_COLUMNS + [(("calibration", "ratio_by_sigma", b), f"ratio σ ∈ {b}", "one") for b in bins]
    names = sorted({b for _, _, m in rows
                    for b in (_get(m, ("calibration", "spearman_excess_by_bin")) or {})},
                   key=lambda b: float(b[1:].split(",")[0]))
    bins = (f"\nExcess Spearman bins (log-σ, {CAL_BIN_DECADES:g} decade wide, ≥ {CAL_MIN_POINTS} held-out "
            "points): " + ", ".join(names) + ".\n")
    per = [(name, m["calibration"]["by_sigma"]) for name, _, m in rows     # calibration: unguided models only
           if _get(m, ("calibration", "by_sigma", "bins"))]
    by = ("\nVar[x0 | x̃] = diag Σ_φ − σ² per σ bin against the error of μ on the held-out points (half of "
          "them fit the constant, the other half are measured). σ varies within a bin (half a decade), so "
          "here the constant is not the best σ-only predictor: the head-less rows (var_x0 = c_out²(σ), a "
          "function of σ alone) are that yardstick. " + BY_SIGMA_TEXT + "\n\n"
          + by_sigma_markdown(per) if per else "")
    return table(rows, cols) + (bins if names else "") + by


BY_SIGMA_TEXT = (
    "Per σ bin: floored, the share of elements with var_x0 ≤ (1e-3·σ)² (a claim to know x0 better than 0.1% "
    "of the noise std); on the rest: NLL of x0 under N(μ, var_x0) in nats per element, the same for the best "
    "constant variance of the bin (fitted on a separate half of the examples), the gain (constant − head, "
    "> 0: the head is better) ± its bootstrap sd over examples, and whether it is resolved (|gain| > 2 sd); "
    "coverage of ±1 / ±2 predicted std (ideal 68.3% / 95.4%); Spearman of the predicted std with |μ − x0|. "
    "NLL all: every element, var_x0 clamped at the floor (floor-dominated unless the floored share is tiny). "
    "Over seeds: mean ± std of the seeds' values.")
_VERDICT = {"head better": "head", "baseline better": "baseline", "not resolved": "unresolved"}


def by_sigma_markdown(rows) -> str:
    """A markdown table of `calibration.calibration_by_sigma` readouts, one line per (name, σ bin); rows:
    (name, readout) pairs; a readout may be a multi-seed summary ({"mean", "std"} leaves)."""
    def num(v):
        return _cell(v) if isinstance(v, dict) or v is None else _fmt(v)

    def pct(v):
        if isinstance(v, dict):
            return "–" if v.get("mean") is None else f"{100 * v['mean']:.2f}% ± {100 * v['std']:.2f}"
        return "–" if v is None else f"{100 * v:.2f}%"

    def gain(g):
        if not g or g.get("nll") is None or (isinstance(g["nll"], dict) and g["nll"].get("mean") is None):
            return "–"
        if isinstance(g["nll"], dict):
            return _cell(g["nll"]) + " (seeds)"
        return f"{g['nll']:+.4f} ± {g['nll_sd']:.4f} ({_VERDICT.get(g['verdict'], g['verdict'])})"

    others = list(dict.fromkeys(b for _, r in rows for row in r["bins"].values() for b in row["gain"]
                                if b != "constant"))
    lines = ["| run | σ | floored | NLL | NLL const. | gain over const. | ±1 std | ±2 std | Spearman | "
             "NLL all (floored) |" + "".join(f" gain over {b} |" for b in others),
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(others)]
    for name, r in rows:
        for label, row in r["bins"].items():
            h = row["head"]
            cells = [name, label.removeprefix("sigma="), pct(h["floored_share"]), num(h["nll"]),
                     num(row["constant"]["nll"]), gain(row["gain"]["constant"]), pct(h["coverage_1s"]),
                     pct(h["coverage_2s"]), num(h["spearman"]), num(h["nll_floored_all"]),
                     *(gain(row["gain"].get(b)) for b in others)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def score_bins_markdown(result: dict) -> str:
    """σ²-weighted score error per σ range, one row per run and guidance, and the reference rows."""
    rows = [r for r in metrics_rows(result) if isinstance(_get(r[2], ("score_error_by_sigma",)), dict)]
    if not rows:
        return ""
    bins = list(rows[0][2]["score_error_by_sigma"])
    return table(rows, [(("score_error_by_sigma", b), f"σ ∈ {b}", "min") for b in bins])


def guidance_effect(runs: dict) -> dict:
    """Per run, what autoguidance did to the unguided samples: change in MMD², relative change in outliers,
    change in mean and median sample NLL (None where a value is missing, e.g. a diverged run's)."""
    def ok(*v):
        return all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
    out = {}
    for name, per in runs.items():
        u, g = per.get("unguided"), per.get("autoguided")
        if not (u and g):
            continue
        diff = {k: g[k] - u[k] if ok(g.get(k), u.get(k)) else None
                for k in ("mmd", "sample_nll", "median_nll")}
        out[name] = {
            "mmd_change": diff["mmd"],  # a difference: unbiased MMD² near 0 (even < 0) makes ratios noise
            "outlier_change": (g["outlier_rate"] - u["outlier_rate"]) / u["outlier_rate"]
            if ok(g.get("outlier_rate"), u.get("outlier_rate")) and u["outlier_rate"] else None,
            "sample_nll_change": diff["sample_nll"],
            "median_nll_change": diff["median_nll"],
        }
    return out


TRAINING_COLUMNS = [
    (("loss",), "loss (last quarter)", None),
    (("loss_var",), "per-batch loss variance, last quarter ↓", "min"),
    (("loss_var_first",), "variance, first 256 it ↓", "min"),
]


def training_markdown(result: dict) -> str:
    """The training loss as an estimator, per trained model: its mean and per-example variance (T17, T20)."""
    rows = [(name, "–", m) for name, m in (result.get("training") or {}).items()]
    return table(rows, TRAINING_COLUMNS) if rows else ""


def guidance_markdown(result: dict) -> str:
    effect = result.get("guidance_effect") or {}
    rows = []
    for n, m in effect.items():
        u, g = (_center(_get(result["runs"], (n, lab, "mmd"))) for lab in ("unguided", "autoguided"))
        rows.append((n, "autoguided vs unguided",
                     {**m, "mmd_ratio_of_means": g / u if u and g is not None else None}))
    return table(rows, GUIDANCE_COLUMNS) if rows else ""


def seed_slice(summary, i: int):
    """Seed i's values out of a `summarize_seeds` tree (a {"mean", "std", "values"} leaf gives values[i])."""
    if isinstance(summary, dict):
        if "values" in summary and "mean" in summary:
            return summary["values"][i]
        return {k: seed_slice(v, i) for k, v in summary.items()}
    return summary


def _merge(items):
    """Seed values → {"mean", "std", "values", "n"} leaves (None entries left out of mean and std); a
    non-numeric leaf stays as it is when every seed has the same, else its mean and std are None."""
    present = [it for it in items if it is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for it in present for k in it))  # union: bins may differ per seed
        return {k: _merge([it.get(k) if isinstance(it, dict) else None for it in items]) for k in keys}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        vals = [float(v) for v in present if isinstance(v, (int, float)) and math.isfinite(v)]
        if not vals:
            return None
        t = torch.tensor(vals, dtype=torch.float64)
        return {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0,
                "values": [None if v is None else float(v) for v in items], "n": len(vals)}
    if all(it == first for it in present):
        return first
    # other leaves (a verdict, a reliability list) that differ by seed: each seed's, no mean
    return {"mean": None, "std": None, "values": list(items), "n": len(present)}


def summarize_seeds(results: list) -> dict:
    """Per metric mean ± sample std over seeds; same layout as one seed's result, numbers become
    {"mean", "std", "values", "n"}: a value missing in some seed (None) is left out of mean and std,
    and n says how many seeds had it."""
    out = {k: _merge([r.get(k) for r in results]) for k in ("runs", "reference", "training")}
    out["guidance_effect"] = _merge([guidance_effect(r["runs"]) for r in results])
    for part in (out["runs"], out["reference"]):  # NFE is a count, the same for every seed
        for per in part.values():
            for m in (per.values() if "nfe" not in per else [per]):
                if isinstance(m, dict) and isinstance(m.get("nfe"), dict):
                    m["nfe"] = int(m["nfe"]["mean"])
    out["config"] = {**results[0]["config"], "seed": [r["config"]["seed"] for r in results]}
    out["timings"] = {"total_s": sum(r["timings"]["total_s"] for r in results),
                      "seeds": [r["timings"] for r in results]}
    return out


def rerender(out_dir: str) -> dict:
    """Recompute the derived parts of a finished result (the guidance effect, per seed for a summary) from its
    metrics.json and write metrics.json and metrics.md again: new report code, no retraining."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        result = json.load(f)
    seeds = result["config"]["seed"]
    if isinstance(seeds, list):
        result["guidance_effect"] = _merge([guidance_effect(seed_slice(result["runs"], i))
                                            for i in range(len(seeds))])
    else:
        result["guidance_effect"] = guidance_effect(result["runs"])
    write_metrics(result, out_dir)
    return result


def _fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:.3e}"


def _seeds_text(seed) -> str:
    if isinstance(seed, list):
        return f"mean ± std over seeds {', '.join(map(str, seed))} (per seed: seed-*/)"
    return f"seed {seed}"


def write_metrics(result: dict, out_dir: str) -> None:
    save_json(result, os.path.join(out_dir, "metrics.json"))
    cfg = result["config"]
    sampler = cfg["sampler"]
    head = (f"# gendiff ablate: 2-D tree, class {cfg['classes']}\n\n"
            f"{cfg['train']['iterations']} iterations × batch {cfg['train']['batch']}, "
            f"{_seeds_text(cfg['seed'])}, {cfg['samples']} samples, Heun {sampler['steps']} steps from "
            f"{'exact samples of p(x; σ_max)' if sampler['init'] == 'exact' else 'N(0, σ_max²I)'}, "
            f"autoguidance w = {cfg['guidance']} (guide: {cfg['guide']}). MMD² is unbiased (can be < 0); the "
            "ground-truth row is a second independent ground-truth set; exact-denoiser samples with the "
            "true posterior mean; source-optimum rows are the exact source-mode optimum read through T13 or "
            "T14.\n\n")
    parts = [head + metrics_markdown(result)]
    for title, text, body in (
            ("Score error by noise level",
             "σ²‖s_θ − s*‖² averaged within each σ range of the held-out points.",
             score_bins_markdown(result)),
            ("Calibration of σ_φ",
             "Learned Σ_φ against the exact optimum of the run's own loss (T8/T12) on the "
             "held-out points; rows without a head have σ_φ = c_var (what σ alone predicts). The ratio is "
             "E[tr(Σ_φ⁻¹(σ²I + Σ_src + (μ − x0)(μ − x0)ᵀ))]/d: 1 when calibrated, > 1 over-confident.",
             calibration_markdown(result)),
            ("What autoguidance does", "Per run: autoguided against unguided samples of the same model.",
             guidance_markdown(result)),
            ("The training loss as an estimator",
             "Per trained model: the mean training loss and the variance of "
             "the per-example loss within a batch (the T17 estimator's variance for weighted runs; losses of "
             "different runs have different scales unless they share the weighting).",
             training_markdown(result))):
        if body:
            parts.append(f"\n## {title}\n\n{text}\n\n{body}")
    save_text("".join(parts), os.path.join(out_dir, "metrics.md"))


# ---- figures ------------------------------------------------------------------------------------

def _views(ref: torch.Tensor):
    """A square view holding 99.8% of the ground truth, and a zoom (1/4 of its width) on a branch tip."""
    lo, hi = torch.quantile(ref, 0.001, dim=0), torch.quantile(ref, 0.999, dim=0)
    c, half = (lo + hi) / 2, float((hi - lo).max()) * 0.6
    view = ((float(c[0]) - half, float(c[0]) + half), (float(c[1]) - half, float(c[1]) + half))
    tip = ref[(ref - c).square().sum(1).argmax()]  # the sample farthest from the centre: a branch end
    z = half / 4
    zoom = ((float(tip[0]) - z, float(tip[0]) + z), (float(tip[1]) - z, float(tip[1]) + z))
    return view, zoom


def _grid(view, res):
    gx = torch.linspace(*view[0], res, dtype=torch.float64)
    gy = torch.linspace(*view[1], res, dtype=torch.float64)
    xx, yy = torch.meshgrid(gx, gy, indexing="xy")
    return torch.stack([xx.flatten(), yy.flatten()], 1)


def _logp_grid(gt, view, res=300):
    return gt.logp(_grid(view, res), 0.0).view(res, res)


def _density_panel(ax, lp, view):
    ax.imshow(lp.clamp_min(-6).numpy(), origin="lower", extent=(*view[0], *view[1]), cmap="Oranges", vmin=-6)


def _points(ax, x, title, view):
    ax.plot(*x[:8192].numpy().T, ".", ms=1, alpha=0.3, color="k")
    ax.set_xlim(*view[0])
    ax.set_ylim(*view[1])
    ax.set_title(title, fontsize=9)


def _finish(ax):
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _phi_maps(ax_l, ax_r, ev, model, spec, view, exact_maps: dict, sigma=0.05, res=150):
    """Learned √(mean σ_φ²) over a grid at one σ, beside the exact optimum (T8 / T12); exact_maps caches the
    optimum per training mode (the same for every run of that mode)."""
    x = _grid(view, res)
    s = torch.full((len(x),), sigma, dtype=torch.float64)
    with torch.no_grad():
        pred = model.predict(x.float(), s.float()[:, None])
        learned = pred.variance().double().mean(1)
    if spec.mode not in exact_maps:
        exact_maps[spec.mode] = ev.gt.denoiser(spec.mode).predict(x, s).variance().mean(1)
    exact = exact_maps[spec.mode]
    lo, hi = math.log10(sigma), float(exact.sqrt().log10().max())
    for ax, v, t in ((ax_l, learned, "learned σ_φ"), (ax_r, exact, "exact optimum")):
        im = ax.imshow(v.sqrt().log10().view(res, res).numpy(), origin="lower", extent=(*view[0], *view[1]),
                       vmin=lo, vmax=hi, cmap="viridis")
        ax.set_title(f"{t} (log10, σ={sigma})", fontsize=9)
        _finish(ax)
    return im


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_run_figure(name: str, guidance: float, ev, model, spec, per: dict, out_dir: str) -> None:
    """OUT/figures/<name>.png: ground truth, samples, trajectories into a branch tip, and σ_φ maps beside the
    exact optimum. per: {"unguided": (samples, trajectory), "autoguided": (…)}. The ground-truth density and
    exact maps are the same for every run: computed once per evaluator `ev` (ev.figure_cache)."""
    plt = _plt()
    view, zoom = _views(ev.ref.float())
    cache = ev.__dict__.setdefault("figure_cache", {"exact_maps": {}})
    for v in (view, zoom):
        if v not in cache:
            cache[v] = _logp_grid(ev.gt, v)
    logp, exact_maps = {v: cache[v] for v in (view, zoom)}, cache["exact_maps"]
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    has_phi = make_head(spec.head).has_confidence
    n = 6 if has_phi else 4
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n + (0.6 if has_phi else 0), 3.4), layout="constrained")
    _density_panel(axes[0], logp[view], view)
    axes[0].set_title("ground truth log p", fontsize=9)
    _points(axes[1], per["unguided"][0], "unguided", view)
    _points(axes[2], per["autoguided"][0], f"autoguided (w={guidance})", view)
    _density_panel(axes[3], logp[zoom], zoom)
    for traj, color in ((per["unguided"][1], "C0"), (per["autoguided"][1], "C3")):
        end = traj[-1]
        inside = ((end[:, 0] > zoom[0][0]) & (end[:, 0] < zoom[0][1])
                  & (end[:, 1] > zoom[1][0]) & (end[:, 1] < zoom[1][1]))
        traj = traj[:, inside][:, :40]  # trajectories that end in the zoomed region
        axes[3].plot(*traj.numpy().transpose(2, 0, 1), "-", lw=0.6, alpha=0.6, color=color)
        axes[3].plot(*traj[-1].numpy().T, ".", ms=3, color=color)
    axes[3].set_xlim(*zoom[0])
    axes[3].set_ylim(*zoom[1])
    axes[3].set_title("zoom: trajectories (blue unguided, red guided)", fontsize=8)
    if has_phi:
        im = _phi_maps(axes[4], axes[5], ev, model, spec, view, exact_maps)
        fig.colorbar(im, ax=axes[4:6], shrink=0.8)
    for ax in axes:
        _finish(ax)
    fig.suptitle(name)
    save_figure(fig, os.path.join(fig_dir, f"{name}.png"), dpi=110)
    plt.close(fig)


def write_comparison(ref: torch.Tensor, figs: dict, out_dir: str) -> None:
    """OUT/figures/comparison.png: the ground-truth samples `ref` beside every run's, unguided and
    autoguided."""
    plt = _plt()
    view, _ = _views(ref)
    names = list(figs)
    fig, axes = plt.subplots(2, len(names) + 1, figsize=(3 * (len(names) + 1), 6.2), squeeze=False)
    for row, label in enumerate(("unguided", "autoguided")):
        _points(axes[row, 0], ref, "ground truth", view)
        for j, name in enumerate(names):
            _points(axes[row, j + 1], figs[name][label][0], f"{name}\n{label}", view)
    for ax in axes.flat:
        _finish(ax)
    fig.tight_layout()
    os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
    save_figure(fig, os.path.join(out_dir, "figures", "comparison.png"), dpi=110)
    plt.close(fig)
