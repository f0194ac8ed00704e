"""`gendiff report FOLDER` → FOLDER/index.html: one self-contained page (images embedded as data URIs) for a
run folder of `gendiff train` (toy or images) or a results folder of `gendiff ablate`.

Run folder: the config, the final metrics (each with its direction and unit), loss curves from metrics.jsonl,
the samples, the results of `gendiff eval` and `gendiff likelihood` the folder holds; for a toy model with a
confidence head the σ_φ map beside the exact optimum (T8), for an image model the uncertainty maps of noised
images (uncertainty.png). Results folder: metrics.md's tables and every
PNG figure in the folder. The page checks on load that every image decoded and records it in
`<body data-images="ok:N">` (or "broken:K/N"), which the browser test reads back.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os

import matplotlib

from ..io import save_text
from .kinds import load_run
from .runfolder import read_config, read_json
from .toy import phi_map

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.dataset.images = bad ? `broken:${bad}/${imgs.length}` : `ok:${imgs.length}`;
});
</script>"""
_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
          "img{max-width:100%}img.pixels{image-rendering:pixelated;width:100%;max-width:900px}"
          "pre{background:#f6f6f6;padding:1em;overflow-x:auto}")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return _img_bytes(buf.getvalue())


def _img_bytes(data: bytes, alt: str = "figure", pixels: bool = False) -> str:
    cls = ' class="pixels"' if pixels else ""
    src = f"data:image/png;base64,{base64.b64encode(data).decode()}"
    return f'<img{cls} alt="{html.escape(alt)}" src="{src}">'


def _table(rows, header) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="metrics"><tr>{head}</tr>{body}</table>'


def _markdown_tables(md: str) -> str:
    """Markdown headings, paragraphs and pipe tables as HTML (enough for metrics.md)."""
    out, table = [], []

    def flush():
        if table:
            cells = [[c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
                     for line in table
                     if not set(line.replace("|", "").strip()) <= set("-: ")]
            out.append(_table(cells[1:], cells[0]))
            table.clear()
    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 4)
            out.append(f"<h{level + 1}>{html.escape(line.lstrip('#').strip())}</h{level + 1}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def _page(title: str, parts: list) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts)
            + f"\n{_CHECK}</body></html>\n")


def _loss_curves(path: str) -> str:
    with open(path) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    if not lines:
        return "<p>(no logged steps yet)</p>"
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for ax, key in zip(axes, ("loss", "loss_var", "lr")):
        ax.plot([x["step"] for x in lines], [x[key] for x in lines])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


# what each metric means: direction (↓ lower is better, ↑ higher, · no direction) and unit
METRIC_INFO = {
    "fid": ("↓", "Fréchet distance in the feature classifier's space, ± its bootstrap sd over the samples"),
    "fid_sd": ("·", "bootstrap sd of the FID (the generated samples resampled)"),
    "sigma_data": ("·", "σ_data of the EDM preconditioning (measured from the training images unless given)"),
               "precision": ("↑", "share of samples"),
    "recall": ("↑", "share of real images"), "label_accuracy": ("↑", "share"),
    "classifier_test_accuracy": ("↑", "share; chance is classifier_chance"),
               "classifier_chance": ("·", "share"),
    "sample_metrics_unreliable": ("·",
                                  "true: the classifier is near chance, FID/precision/recall mean nothing"),
    "bpd_pf_ode": ("↓", "bits/dim"), "bpd_pf_ode_se": ("·", "bits/dim, standard error"),
    "bpd_ddpm_bound": ("↓", "bits/dim"),
    "bpd_ddpm_bound_se": ("·", "bits/dim, standard error (images and the random draw of steps)"),
    "bpd_ddpm_bound_se_steps": ("·", "bits/dim, standard error from drawing the steps alone"),
    "bpd_ddpm_bound_beta1": ("↓", "bits/dim, the same bound with the β_1 decoder (fixed-variance rows)"),
    "pf_ode_bpd": ("↓", "bits/dim"), "elbo_bpd": ("↓", "bits/dim (a bound)"),
               "exact_bpd": ("·", "bits/dim (truth)"),
    "sample_nll": ("↓", "nats, exact −log p of the samples"), "median_nll": ("↓", "nats"),
    "outlier_rate": ("↓", "share of samples"), "mmd": ("↓", "MMD², unbiased (can be < 0)"),
    "nonfinite": ("↓", "share of samples"), "score_error": ("↓", "σ²‖s_θ − s*‖², mean"),
    "final_loss": ("↓", "training loss, mean of the last 50 steps"), "bad_steps": ("↓", "skipped steps"),
    "train_img_per_s": ("↑", "images/s"), "nfe": ("·", "network evaluations per sample"),
    "spearman": ("↑", "rank correlation of predicted and actual error"),
               "coverage_1sigma": ("·", "ideal 0.683"),
    "coverage_2sigma": ("·", "ideal 0.954"), "nll_gain": ("↑", "nats/pixel over the best constant σ"),
    "excess_floored": ("↓", "share of pixels with σ_φ ≤ σ"),
    # calibration.calibration_by_sigma (per σ bin and predictor)
    "floored_share": ("↓", "share of elements with Var[x0 | x̃] ≤ (1e-3·σ)², left out of the rest"),
    "nll": ("↓", "nats/element, −log N(x0; μ, var) on the head's unfloored elements"),
    "nll_floored_all": ("↓", "nats/element over all elements, var clamped at the floor"),
    "coverage_1s": ("·", "ideal 0.683"), "coverage_2s": ("·", "ideal 0.954"), "z2_mean": ("·", "ideal 1"),
    "nll_sd": ("·", "bootstrap sd over examples"), "nll_floored_all_sd": ("·", "bootstrap sd over examples"),
    "verdict": ("·", "NLL gain resolved at 2 bootstrap sd?"),
    "var": ("·", "the best constant variance of the bin (fit split)"),
}


def _flat(m: dict, prefix: str = ""):
    for k, v in m.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            yield prefix + k, v


def _metrics_table(m: dict) -> str:
    rows, flat = [], dict(_flat(m))
    for k, v in flat.items():
        if k.endswith("fid_sd") and k[:-3] in flat:                  # shown with its FID: "48.2 ± 4.9"
            continue
        direction, unit = METRIC_INFO.get(k.rsplit(".", 1)[-1], ("", ""))
        text = f"{v:.6g}" if isinstance(v, float) else v
        if isinstance(flat.get(k + "_sd"), float) and k.rsplit(".", 1)[-1] == "fid":
            text = f"{v:.1f} ± {flat[k + '_sd']:.1f}"
        rows.append((k, text, direction, unit))
    return _table(rows, ("metric", "value", "better", "unit / meaning"))


def _read(path: str):
    with open(path) as f:
        return json.load(f)


def _figure(fig) -> str:
    img = _png(fig)
    plt.close(fig)
    return img


def run_report(out: str) -> str:
    parts = ["<h2>Config</h2><pre>" + html.escape(open(os.path.join(out, "config.toml")).read()) + "</pre>"]
    if os.path.exists(os.path.join(out, "data.txt")):
        parts.append("<p>" + html.escape(open(os.path.join(out, "data.txt")).read()) + "</p>")
    mpath = os.path.join(out, "metrics.json")
    if os.path.exists(mpath):
        m = _read(mpath)
        if m.get("sample_metrics_unreliable"):
            parts.append(f"<p><b>Sample metrics unreliable:</b> the feature classifier's test accuracy is "
                         f"{m['classifier_test_accuracy']:.3f} against chance {m['classifier_chance']:.3f}; "
                         "FID, precision and recall below measure nothing.</p>")
        parts.append("<h2>Metrics</h2>" + _metrics_table(m))
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        parts.append("<h2>Training</h2>" + _loss_curves(os.path.join(out, "metrics.jsonl")))
    for f in sorted(os.listdir(out)):
        if f.startswith("samples") and f.endswith(".png"):
            parts.append(f"<h2>{html.escape(f)}</h2>" + _img_bytes(open(os.path.join(out, f), "rb").read(), f,
                                                                     pixels=_is_image_run(out)))
    if os.path.exists(os.path.join(out, "calibration.png")):
        text = ("Per σ: the mean squared error of μ against the mean predicted Var[x0 | x̃] = σ_φ² − σ² in "
                "deciles of the prediction (on the diagonal when calibrated), the best constant as one "
                "point; the floored share and the NLL gain over the constant ± its bootstrap sd in each "
                "title.")
        parts.append(f"<h2>Calibration of the confidence head</h2><p>{text}</p>"
                     + _img_bytes(open(os.path.join(out, "calibration.png"), "rb").read(), "calibration.png"))
    for name, what in (("uncertainty.png", "noised test images"), ("uncertainty-generated.png",
                                                                    "the model's own samples, noised again")):
        if os.path.exists(os.path.join(out, name)):
            parts.append(f"<h2>Uncertainty of the confidence head: {what}</h2><p>Per row one image at one σ: "
                         "the noisy input, the denoised μ, the predicted std of x0 √(σ_φ² − σ²) (T8), the "
                         "actual error |μ − x0| (root mean square over channels), x0; the two maps share one "
                         "colour scale.</p>"
                         + _img_bytes(open(os.path.join(out, name), "rb").read(), name))
    for f in sorted(os.listdir(out)):
        if (f.startswith("eval-") or f == "likelihood.json") and f.endswith(".json"):
            parts.append(f"<h2>{html.escape(f)}</h2>" + _metrics_table(_read(os.path.join(out, f))))
    if os.path.exists(os.path.join(out, "reconstructions.png")):
        parts.append("<h2>Reconstructions</h2><p>Test images (first row) and the VAE's reconstructions of "
                     "their posterior mean (second row).</p>"
                     + _img_bytes(open(os.path.join(out, "reconstructions.png"), "rb").read(),
                                  "reconstructions.png", pixels=True))
    if os.path.exists(os.path.join(out, "model.safetensors")) and read_config(out, "folder").kind == "toy":
        cfg, model = load_run(out)
        fig = phi_map(cfg, model)
        if fig is not None:
            parts.append("<h2>Confidence σ_φ</h2>" + _figure(fig))
    return _page(f"gendiff run {os.path.basename(os.path.abspath(out))}", parts)


def _is_image_run(out: str) -> bool:
    return read_config(out, "folder").kind in ("images", "latent")     # a latent run's samples are decoded


def results_report(out: str) -> str:
    parts = []
    for name in ("metrics.md", "images.md", "latent.md"):   # gendiff ablate; --suite images; --suite latent
        md = os.path.join(out, name)
        if os.path.exists(md):
            parts.append(_markdown_tables(open(md).read()))
    rows = []                                                        # the table's run folders, one per row
    if os.path.exists(os.path.join(out, "images.json")):
        rows = sorted(read_json(os.path.join(out, "images.json"))["rows"])
    elif os.path.exists(os.path.join(out, "latent.json")):
        rows = read_json(os.path.join(out, "latent.json"))["folders"]
    pngs = [os.path.join(d, f) for d in (out, os.path.join(out, "figures"),
                                         *(os.path.join(out, r) for r in rows))
            if os.path.isdir(d) for f in sorted(os.listdir(d)) if f.endswith(".png")]
    for path in pngs:
        name = os.path.relpath(path, out)
        parts += [f"<h3>{html.escape(name)}</h3>", _img_bytes(open(path, "rb").read(), name)]
    return _page(f"gendiff results {os.path.basename(os.path.abspath(out))}", parts)


def write_report(out: str) -> str:
    """Write FOLDER/index.html for a run folder (config.toml) or an ablate results folder (metrics.json, or
    images.json of --suite images)."""
    if os.path.exists(os.path.join(out, "config.toml")):
        page = run_report(out)
    elif any(os.path.exists(os.path.join(out, f)) for f in ("metrics.json", "images.json", "latent.json")):
        page = results_report(out)
    else:
        raise ValueError(f"folder={out!r} is neither a run folder (config.toml) nor a gendiff ablate results "
                         "folder (metrics.json, images.json or latent.json)")
    path = os.path.join(out, "index.html")
    save_text(page, path)
    return path
