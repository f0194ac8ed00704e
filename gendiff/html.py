"""`gendiff report FOLDER` → FOLDER/index.html: one self-contained page (images embedded as data URIs) for a
run folder of `gendiff train` or a results folder of `gendiff ablate` (issue 9).

Run folder: the config, the final metrics, loss curves from metrics.jsonl, the samples plot, and for models
with a confidence head the σ_φ map beside the exact optimum (T8). Results folder: metrics.md's tables and every
PNG figure in the folder. The page checks on load that every image decoded and records it in
`<body data-images="ok:N">` (or "broken:K/N"), which the browser test reads back.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os

import torch

from .io import save_text

_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.dataset.images = bad ? `broken:${bad}/${imgs.length}` : `ok:${imgs.length}`;
});
</script>"""
_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;"
          "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}pre{background:#f6f6f6;"
          "padding:1em;overflow-x:auto}")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return _img_bytes(buf.getvalue())


def _img_bytes(data: bytes, alt: str = "figure") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(rows, header) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="metrics"><tr>{head}</tr>{body}</table>'


def _markdown_tables(md: str) -> str:
    """Markdown headings, paragraphs and pipe tables as HTML (enough for metrics.md)."""
    out, table = [], []

    def flush():
        if table:
            cells = [[c.strip().replace("**", "") for c in line.strip().strip("|").split("|")] for line in table
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def _phi_map(out: str) -> str:
    """σ_φ of the run's model on a grid at σ = 0.05 beside the exact optimum (T8), log10."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .data.toy import tree
    from .run import load_run
    cfg, model = load_run(out)
    if model.head.name == "none":
        return ""
    gt, sigma, res = tree(cfg.classes), 0.05, 120
    ref = gt.sample(4096, generator=torch.Generator().manual_seed(0))[0]
    lo, hi = ref.min(0).values - 0.2, ref.max(0).values + 0.2
    gx, gy = (torch.linspace(float(lo[i]), float(hi[i]), res) for i in (0, 1))
    x = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).reshape(-1, 2)
    s = torch.full((len(x),), sigma)
    with torch.no_grad():
        learned = model.predict(x, s).variance().double().mean(1)
    exact = gt.denoiser("point").predict(x.double(), s.double()).variance().mean(1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    vmin, vmax = float(exact.sqrt().log10().min()), float(exact.sqrt().log10().max())   # one colour scale
    for ax, v, t in ((axes[0], learned, "learned σ_φ"), (axes[1], exact, "exact optimum (T8)")):
        im = ax.imshow(v.sqrt().log10().view(res, res).numpy(), origin="lower", vmin=vmin, vmax=vmax,
                       extent=(float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])), cmap="viridis")
        ax.set_title(f"{t}, log10, σ = {sigma}")
    fig.colorbar(im, ax=axes, shrink=0.8)
    img = _png(fig)
    plt.close(fig)
    return "<h2>Confidence σ_φ</h2>" + img


def run_report(out: str) -> str:
    parts = ["<h2>Config</h2><pre>" + html.escape(open(os.path.join(out, "config.toml")).read()) + "</pre>"]
    mpath = os.path.join(out, "metrics.json")
    if os.path.exists(mpath):
        m = json.load(open(mpath))
        rows = [(k, f"{v:.6g}" if isinstance(v, float) else v) for k, v in m.items() if not isinstance(v, dict)]
        parts.append("<h2>Metrics</h2>" + _table(rows, ("metric", "value")))
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        parts.append("<h2>Training</h2>" + _loss_curves(os.path.join(out, "metrics.jsonl")))
    if os.path.exists(os.path.join(out, "samples.png")):
        parts.append("<h2>Samples</h2>" + _img_bytes(open(os.path.join(out, "samples.png"), "rb").read(), "samples"))
    if os.path.exists(os.path.join(out, "model.safetensors")):
        parts.append(_phi_map(out))
    return _page(f"gendiff run {os.path.basename(os.path.abspath(out))}", parts)


def results_report(out: str) -> str:
    parts = []
    md = os.path.join(out, "metrics.md")
    if os.path.exists(md):
        parts.append(_markdown_tables(open(md).read()))
    pngs = [os.path.join(d, f) for d in (out, os.path.join(out, "figures")) if os.path.isdir(d)
            for f in sorted(os.listdir(d)) if f.endswith(".png")]
    for path in pngs:
        name = os.path.relpath(path, out)
        parts += [f"<h3>{html.escape(name)}</h3>", _img_bytes(open(path, "rb").read(), name)]
    return _page(f"gendiff results {os.path.basename(os.path.abspath(out))}", parts)


def write_report(out: str) -> str:
    """Write FOLDER/index.html for a run folder (config.toml) or an ablate results folder (metrics.json)."""
    if os.path.exists(os.path.join(out, "config.toml")):
        page = run_report(out)
    elif os.path.exists(os.path.join(out, "metrics.json")):
        page = results_report(out)
    else:
        raise ValueError(f"folder={out!r} is neither a run folder (config.toml) nor a gendiff ablate results "
                         "folder (metrics.json)")
    path = os.path.join(out, "index.html")
    save_text(page, path)
    return path
