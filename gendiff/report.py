"""Results of `gendiff ablate`: metrics.json, metrics.md (best per column in bold) and figures."""
from __future__ import annotations

import math
import os

import torch

from .io import save_figure, save_json, save_text

COLUMNS = [  # key, header, better ("min", "max", "zero" for closest to 0, None: no bold)
    ("sample_nll", "sample NLL ↓", "min"),
    ("median_nll", "median NLL ↓", "min"),
    ("outlier_rate", "outliers ↓", "min"),
    ("mmd", "MMD² ↓", "zero"),
    ("nonfinite", "diverged ↓", "min"),
    ("score_error", "score error ↓", "min"),
    ("calibration.spearman", "σ_φ² Spearman ↑", "max"),
    ("calibration.median_rel_error", "σ_φ² med. rel. err ↓", "min"),
    ("calibration.spearman_excess", "excess Spearman ↑", "max"),
    ("calibration.median_rel_error_excess", "excess med. rel. err ↓", "min"),
    ("nfe", "NFE", None),
    ("sample_s", "sampling s", None),
]


def _get(m: dict, key: str):
    for part in key.split("."):
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
    if v is None:
        return "–"
    if isinstance(v, dict):
        return f"{_fmt(v['mean'])} ± {_fmt(v['std'])}"
    return f"{v:d}" if isinstance(v, int) else _fmt(v)


def metrics_markdown(result: dict) -> str:
    rows = metrics_rows(result)
    def shown(key):  # the "diverged" column only when something diverged
        vals = [_center(_get(m, key)) for _, _, m in rows]
        return any(v is not None for v in vals) and (key != "nonfinite" or any(v for v in vals))
    cols = [c for c in COLUMNS if shown(c[0])]
    best = {}
    for key, _, better in cols:
        vals = [_center(_get(m, key)) for name, _, m in rows if not name.endswith("(reference)")]
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if vals and better:
            best[key] = {"min": min, "max": max, "zero": lambda v: min(v, key=abs)}[better](vals)
    lines = ["| run | guidance | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name, label, m in rows:
        cells = []
        for key, _, _ in cols:
            v = _get(m, key)
            s = _cell(v)
            if v is not None and key in best and _center(v) == best[key] and not name.endswith("(reference)"):
                s = f"**{s}**"
            cells.append(s)
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def score_bins_markdown(result: dict) -> str:
    """σ²-weighted score error per σ range, one row per run and guidance."""
    rows = [(n, g, m["score_error_by_sigma"]) for n, per in result["runs"].items() for g, m in per.items()
            if isinstance(m.get("score_error_by_sigma"), dict)]
    if not rows:
        return ""
    bins = list(rows[0][2])
    lines = ["| run | guidance | " + " | ".join(f"σ ∈ {b}" for b in bins) + " |", "|---|---|" + "---|" * len(bins)]
    lines += [f"| {n} | {g} | " + " | ".join(_cell(m.get(b)) for b in bins) + " |" for n, g, m in rows]
    return "\n".join(lines) + "\n"


def summarize_seeds(results: list) -> dict:
    """Per metric mean ± sample std over seeds; same layout as one seed's result, numbers become
    {"mean", "std", "values"}."""
    def merge(items):
        first = items[0]
        if isinstance(first, dict):
            return {k: merge([it[k] for it in items]) for k in first if all(k in it for it in items)}
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            t = torch.tensor([float(v) for v in items], dtype=torch.float64)
            std = float(t.std()) if len(t) > 1 else 0.0
            return {"mean": float(t.mean()), "std": std, "values": [float(v) for v in items]}
        return first
    out = {k: merge([r[k] for r in results]) for k in ("runs", "reference")}
    for part in out.values():  # NFE is a count, the same for every seed
        for per in part.values():
            for m in (per.values() if "sample_nll" not in per else [per]):
                if isinstance(m.get("nfe"), dict):
                    m["nfe"] = int(m["nfe"]["mean"])
    out["config"] = {**results[0]["config"], "seed": [r["config"]["seed"] for r in results]}
    out["timings"] = {"total_s": sum(r["timings"]["total_s"] for r in results),
                      "seeds": [r["timings"] for r in results]}
    return out


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
    head = (f"# gendiff ablate: 2-D tree, class {cfg['classes']}\n\n"
            f"{cfg['train']['iterations']} iterations × batch {cfg['train']['batch']}, "
            f"{_seeds_text(cfg['seed'])}, "
            f"{cfg['samples']} samples, Heun {cfg['steps']} steps, autoguidance w = {cfg['guidance']} "
            f"(guide: {cfg['guide']}). MMD² is unbiased (can be < 0); the ground-truth row is a second "
            f"independent ground-truth set; exact-denoiser samples with the true posterior mean.\n\n")
    bins = score_bins_markdown(result)
    bins = f"\n## Score error by noise level\n\nσ²‖s_θ − s*‖² averaged within each σ range of the held-out points.\n\n{bins}" \
        if bins else ""
    save_text(head + metrics_markdown(result) + bins, os.path.join(out_dir, "metrics.md"))


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


def _density_panel(ax, gt, view, res=300):
    lp = gt.logp(_grid(view, res), 0.0).view(res, res)
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


def _phi_maps(ax_l, ax_r, ev, model, spec, view, sigma=0.05, res=150):
    """Learned √(mean σ_φ²) over a grid at one σ, beside the exact optimum (T8 / T12)."""
    x = _grid(view, res)
    s = torch.full((len(x),), sigma, dtype=torch.float64)
    with torch.no_grad():
        pred = model.predict(x.float(), s.float()[:, None])
        learned = (torch.diagonal(pred.covariance(), dim1=-2, dim2=-1) if spec.head == "full"
                   else pred.sigma_phi.square()).double().mean(1)
    post = ev.gt.source_posterior(x, s) if spec.mode == "source" else ev.gt.posterior(x, s)
    exact = sigma**2 + torch.diagonal(post.cov, dim1=-2, dim2=-1).mean(1)
    lo, hi = math.log10(sigma), float(exact.sqrt().log10().max())
    for ax, v, t in ((ax_l, learned, "learned σ_φ"), (ax_r, exact, "exact optimum")):
        im = ax.imshow(v.sqrt().log10().view(res, res).numpy(), origin="lower", extent=(*view[0], *view[1]),
                       vmin=lo, vmax=hi, cmap="viridis")
        ax.set_title(f"{t} (log10, σ={sigma})", fontsize=9)
        _finish(ax)
    return im


def write_figures(cfg, ev, models, figs, out_dir) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .ablate import RUNS
    view, zoom = _views(ev.ref.float())
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    for name, per in figs.items():
        spec = RUNS[name]
        has_phi = spec.head != "none"
        n = 6 if has_phi else 4
        fig, axes = plt.subplots(1, n, figsize=(3.0 * n + (0.6 if has_phi else 0), 3.4), layout="constrained")
        _density_panel(axes[0], ev.gt, view)
        axes[0].set_title("ground truth log p", fontsize=9)
        _points(axes[1], per["unguided"][0], "unguided", view)
        _points(axes[2], per["autoguided"][0], f"autoguided (w={cfg.guidance})", view)
        _density_panel(axes[3], ev.gt, zoom)
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
            im = _phi_maps(axes[4], axes[5], ev, models[spec.model or name], spec, view)
            fig.colorbar(im, ax=axes[4:6], shrink=0.8)
        for ax in axes:
            _finish(ax)
        fig.suptitle(name)
        save_figure(fig, os.path.join(fig_dir, f"{name}.png"), dpi=110)
        plt.close(fig)
    names = list(figs)
    fig, axes = plt.subplots(2, len(names) + 1, figsize=(3 * (len(names) + 1), 6.2), squeeze=False)
    for row, label in enumerate(("unguided", "autoguided")):
        _points(axes[row, 0], ev.ref.float(), "ground truth", view)
        for j, name in enumerate(names):
            _points(axes[row, j + 1], figs[name][label][0], f"{name}\n{label}", view)
    for ax in axes.flat:
        _finish(ax)
    fig.tight_layout()
    save_figure(fig, os.path.join(fig_dir, "comparison.png"), dpi=110)
    plt.close(fig)
