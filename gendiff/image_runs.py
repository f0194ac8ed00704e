"""Real images (issue 10): seed 004's table on MNIST, plus the EDM and confidence-aware rows.

Each row is an `ImageObjective` (parameterisation, loss, head, training density, sampler) trained through the
one loop (train.py) on a `DataSource`, sampled by the library's samplers (respaced DDPM ancestral for the DDPM
rows, EDM Heun for the EDM rows, CFG through guidance.classifier_free), and measured by image_metrics: FID,
precision/recall and per-class counts in the features of our own classifier (nets/classifier.py, cached in the
data folder), bits/dim (PF-ODE with Hutchinson on dequantised test images; DDPM's bound for DDPM rows), and for
confidence rows the calibration of σ_φ per pixel with an uncertainty figure.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from .io import derive_seed, generator, save_json

DDPM_T = 1000                      # seed 004 / DDPM: T = 1000 linear β steps
RESPACED = 100                     # default sampling steps of the DDPM rows (IDDPM respacing)
HEUN_STEPS = 18                    # EDM's CIFAR-10 setting: NFE 35
CALIBRATION_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class ImageObjective:
    precond: str                   # precond.PRECONDS key: the parameterisation (T21)
    loss: str                      # simple-x0 | simple-eps | hybrid | edm | nll
    head: str = "none"             # none | diag (σ_φ per pixel) | v (IDDPM learned variance)
    density: str = "ddpm"          # ddpm: t uniform in 1..T (schedules.DDPMSteps); edm: ln σ ~ N(p_mean, p_std²)
    rule: str = "eps"              # DDPM update of seed 004 (samplers.sample_ddpm), for the ddpm density
    conditional: bool = False      # class embedding + label dropout (CFG, T33)
    label_dropout: float = 0.0
    help: str = ""

    @property
    def sampler(self) -> str:
        return "ddpm" if self.density == "ddpm" else "heun"


OBJECTIVES = {
    "x0": ImageObjective("x0", "simple-x0", rule="x0", help="x0-prediction, ‖x̂0 − x0‖² (seed 004)"),
    "eps": ImageObjective("eps", "simple-eps", rule="eps", help="ε-prediction, L_simple = ‖ε̂ − ε‖² (DDPM)"),
    "score": ImageObjective("score-vp", "simple-eps", rule="score", help="score prediction, (1 − ᾱ)‖s − s_θ‖²"),
    "score-cfg": ImageObjective("score-vp", "simple-eps", rule="score", conditional=True, label_dropout=0.1,
                                help="class-conditional score prediction, labels dropped to ∅ w.p. 0.1; sampled "
                                     "with classifier-free guidance at each of cfg_weights (T33)"),
    "learned-variance": ImageObjective("eps", "hybrid", head="v", rule="eps",
                                       help="ε-prediction + IDDPM v head, hybrid loss λ = 0.001 (T26)"),
    "edm": ImageObjective("edm", "edm", density="edm", help="EDM: F-prediction, EDM weighting and density"),
    "confidence": ImageObjective("edm", "nll", head="diag", density="edm",
                                 help="confidence-aware: EDM precond + c_var, σ_φ per pixel, Gaussian NLL (T9)"),
}
TABLE_ROWS = ("x0", "eps", "score", "score-cfg", "learned-variance", "edm", "confidence")


# ---- data, model, objective --------------------------------------------------------------------------

def load_images(dcfg, split: str):
    """ImageData of the run's dataset; folder/npz sources get a deterministic 90/10 train/test split."""
    from .data import images as im
    if dcfg.name in ("mnist", "fashion-mnist"):
        return im.load_mnist(dcfg.name, split, root=dcfg.path or None)
    data = im.load_folder(dcfg.path) if dcfg.name == "folder" else im.load_npz(dcfg.path)
    train, test = data.split(0.1, seed=0)
    return train if split == "train" else test


def _ddpm():
    from .process import DDPM
    return DDPM(T=DDPM_T)


def build_model(cfg, shape: tuple, num_classes: int, backbone=None):
    """Denoiser(UNet) for images of `shape` (C, H, W): G channels for the diag and v heads; class embedding for
    conditional objectives. DDPM rows use σ_data = 1, so that c_in·x̃ = z, the DDPM latent, is the net's input.
    backbone: None (the UNet of cfg.model) or a callable (shape, num_classes, g_channels) -> nn.Module honouring
    the Denoiser contract, to train another network through the same recipe (benchmarks/unet_quality.py)."""
    from .nets.unet import UNet
    from .precond import PRECONDS, Denoiser
    obj, m = OBJECTIVES[cfg.objective], cfg.model
    classes, g = (num_classes if obj.conditional else 0), (shape[0] if obj.head != "none" else 0)
    if backbone is not None:
        net = backbone(shape, classes, g)
    else:
        net = UNet(img_resolution=shape[1], img_channels=shape[0], model_channels=m.model_channels,
                   channel_mult=m.channel_mult, num_blocks=m.num_blocks, attn_resolutions=m.attn_resolutions,
                   dropout=m.dropout, num_classes=classes, g_channels=g, emb_channels=m.emb_channels or None,
                   resample=m.resample)
    sigma_data = 1.0 if obj.density == "ddpm" else cfg.train.sigma_data
    return Denoiser(net, PRECONDS[obj.precond](sigma_data), obj.head)


def load_image_model(out: str, weights: str = "model.safetensors"):
    """(config, model) of a finished image run folder: its config.toml and the weights file (safetensors only),
    in eval mode without gradients."""
    from safetensors.torch import load_file
    from .config import resolve
    path, cfg_path = os.path.join(out, weights), os.path.join(out, "config.toml")
    for f in (cfg_path, path):
        if not os.path.exists(f):
            raise ValueError(f"image run {out!r} has no {os.path.basename(f)}: a finished image run folder holds "
                             f"config.toml and {weights} (`gendiff train --out DIR` writes both)")
    cfg = resolve(toml_path=cfg_path)
    test = load_images(cfg.data, "test")
    model = build_model(cfg, tuple(test.to_tensor().shape[1:]), test.num_classes)
    model.load_state_dict(load_file(path))
    return cfg, model.eval().requires_grad_(False)


def density_and_loss(cfg):
    from .losses import ConfidenceNLL, DDPMSimpleLoss, EDMLoss, HybridLoss
    from .schedules import DDPMSteps, LogNormalSigma
    obj = OBJECTIVES[cfg.objective]
    density = DDPMSteps(_ddpm()) if obj.density == "ddpm" else LogNormalSigma(cfg.train.p_mean, cfg.train.p_std)
    loss = {"simple-x0": lambda: DDPMSimpleLoss("x0"), "simple-eps": lambda: DDPMSimpleLoss("eps"),
            "hybrid": lambda: HybridLoss(density), "edm": EDMLoss, "nll": ConfidenceNLL}[obj.loss]()
    return density, loss


# ---- training ------------------------------------------------------------------------------------------

def resolve_device(device: str | None = None) -> torch.device:
    """auto (None): this rank's GPU when CUDA is there (cuda:$LOCAL_RANK under torchrun), else the CPU."""
    from .checks import check_choice
    device = device or "auto"
    check_choice("device", device, ("auto", "cpu", "cuda"))
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def train_image_run(cfg, out: str, *, progress: bool = True, log=print, primary: bool = True,
                    device: str | None = None, backbone=None) -> dict:
    """Train (or continue) the image run in `out` through train.train on `device` (resolve_device; the data, the
    model and the EMA live there, random draws come from the CPU training generator, so a seed fixes the run on
    any device); evaluate its EMA; returns the metrics. backbone: see build_model."""
    dev = resolve_device(device)
    from .run import train_in_folder
    from .data.sources import DataSource
    obj = OBJECTIVES[cfg.objective]
    data = load_images(cfg.data, "train")
    if cfg.data.subset:
        data = data.subset(min(cfg.data.subset, len(data)), seed=cfg.seed)
    if obj.conditional and data.labels is None:
        raise ValueError(f"objective={cfg.objective!r} is class-conditional; data {data.name!r} has no labels")
    x = data.to_tensor()
    labels = torch.from_numpy(data.labels) if obj.conditional else None
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = build_model(cfg, tuple(x.shape[1:]), data.num_classes, backbone).to(dev)
    source = DataSource(x, labels, data.num_classes if obj.conditional else 0, obj.label_dropout,
                        shape=tuple(x.shape[1:]), name=f"data {data.name!r}", device=dev)
    density, loss = density_and_loss(cfg)
    res = train_in_folder(model, loss, source, cfg, out, density=density, desc=cfg.objective, progress=progress,
                          log=log, primary=primary)
    if not primary:
        return {}
    metrics = evaluate_image_model(res.ema, cfg, out, num_classes=data.num_classes, log=log, train=data)
    metrics.update(train_img_per_s=logged_img_per_s(os.path.join(out, "metrics.jsonl"), cfg.train.batch),
                   train_seconds=res.seconds, iterations=cfg.train.iterations,
                   batch=cfg.train.batch, bad_steps=res.bad_steps, final_loss=_tail_mean(res.losses))
    save_json(metrics, os.path.join(out, "metrics.json"))
    return metrics


def _tail_mean(v, k=50):
    return float(sum(v[-k:]) / len(v[-k:])) if v else float("nan")


# ---- sampling ------------------------------------------------------------------------------------------

class _LastG(torch.nn.Module):
    """A v-head denoiser for sample_ddpm: forward returns μ and keeps G, so the learned variance of the same
    step (`v(z, t)`) costs no second network evaluation (T26)."""

    def __init__(self, model, ddpm, head):
        super().__init__()
        self.model, self.ddpm, self.head, self.last = model, ddpm, head, None

    def forward(self, x, sigma):
        p = self.model.predict(x, sigma)
        self.last = (float(torch.as_tensor(sigma).flatten()[0]), x.shape, self.head.interpolation(p))
        return p.mu

    def v(self, z, t):
        ab, om = float(self.ddpm.alpha_bar[t]), float(self.ddpm.one_minus_alpha_bar[t])
        s = math.sqrt(om / ab)
        if self.last is None or self.last[1] != z.shape or abs(self.last[0] - s) > 1e-6 * s:
            self.forward(z / math.sqrt(ab), s)
        return self.last[2]


def sample_images(model, cfg, n: int, *, labels=None, w: float | None = None, seed: int = 0, num_classes: int = 0,
                  guide=None):
    """n images in [−1, 1] from the run's sampler, in batches of eval.batch, each batch's noise from its own
    generator (a sample does not depend on the batch size's split). Returns (images, info: sampler, NFE, s).
    guide: None, or a callable (denoiser, labels of the batch) -> denoiser wrapping the model for each batch
    (e.g. classifier guidance, guidance.ClassifierGuided; needs `labels`); NFE counts the model's calls."""
    from .guidance import Conditioned, classifier_free
    from .samplers import sample_ddpm, sample_heun
    from .schedules import edm_sigmas
    obj, ev = OBJECTIVES[cfg.objective], cfg.eval
    if guide is not None and (labels is None or len(labels) < n):
        raise ValueError(f"sample_images(guide=...) needs labels, one class per sample ({n}); got "
                         f"{'none' if labels is None else len(labels)}")
    shape = (model.net.img_channels, model.net.img_resolution, model.net.img_resolution)
    dev = next(model.parameters()).device
    calls, outs, start = [0], [], time.perf_counter()
    steps = ev.sampler_steps or (RESPACED if obj.sampler == "ddpm" else HEUN_STEPS)
    ddpm = _ddpm().respaced(min(steps, DDPM_T)) if obj.sampler == "ddpm" else None
    for i in range(0, n, ev.batch):
        k = min(ev.batch, n - i)
        g = generator(seed, f"sample-batch-{i // ev.batch}")
        counted = _Counted(model, calls)
        if obj.conditional:
            y = (labels[i:i + k] if labels is not None else torch.full((k,), num_classes)).to(dev)
            counted = classifier_free(counted, y, num_classes, w) if w is not None else Conditioned(counted, y)
        if guide is not None:
            counted = guide(counted, labels[i:i + k].to(dev))
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            if obj.sampler == "ddpm":
                z = torch.randn((k, *shape), generator=g).to(dev)
                vfn = None
                if obj.head == "v":
                    counted = _LastG(counted, ddpm, model.head)
                    vfn = counted.v
                x = sample_ddpm(counted, z, ddpm, rule=obj.rule, v=vfn, generator=g)
            else:
                sig = edm_sigmas(steps, 0.002, 80.0, 7.0)
                x = sample_heun(counted, torch.randn((k, *shape), generator=g).to(dev) * 80.0, sig, generator=g)
        outs.append(x.float().clamp(-1, 1).cpu())
    nfe = calls[0] // math.ceil(n / ev.batch)
    name = f"DDPM ancestral, respaced {min(steps, DDPM_T)}" if obj.sampler == "ddpm" else f"Heun {steps}"
    return torch.cat(outs), {"sampler": name, "nfe": nfe, "sample_seconds": time.perf_counter() - start}


class _Counted(torch.nn.Module):
    """The model, counting its network evaluations (a CFG step counts its two)."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.calls, self.head = model, calls, model.head

    def forward(self, x, sigma, class_labels=None):
        return self.predict(x, sigma, class_labels).mu

    def predict(self, x, sigma, class_labels=None):
        self.calls[0] += 1
        return self.model.predict(x, sigma, class_labels=class_labels)


# ---- evaluation ----------------------------------------------------------------------------------------

def evaluate_image_model(model, cfg, out: str, *, num_classes: int = 10, log=print, train=None) -> dict:
    """FID / precision / recall / class counts of generated images (our classifier's features), bits/dim,
    σ_φ calibration for confidence models; writes samples*.png and uncertainty.png into `out`."""
    from .image_metrics import image_grid
    obj, ev = OBJECTIVES[cfg.objective], cfg.eval
    model = model.eval()
    test = load_images(cfg.data, "test")
    xt = test.to_tensor()
    metrics: dict = {"objective": cfg.objective, "data": test.name}
    clf, real = None, None
    if test.labels is not None:
        clf, real, acc = feature_classifier(cfg, test, train)
        metrics["classifier_test_accuracy"] = acc
    ws = list(cfg.cfg_weights) if obj.conditional else [None]
    labels = torch.arange(ev.samples) % num_classes if obj.conditional else None
    for w in ws:
        x, info = sample_images(model, cfg, ev.samples, labels=labels, w=w, seed=cfg.seed, num_classes=num_classes)
        key = "" if w is None else f"@w={w:g}"
        row = dict(info)
        if clf is not None:
            row.update(sample_metrics(clf, real, x, test, num_classes, cfg.seed))
        metrics[f"samples{key}"] = row
        image_grid(os.path.join(out, f"samples{key.replace('@', '-')}.png"), x[:64], nrow=8)
        log(f"{cfg.objective}{key}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                    if isinstance(v, float)))
    dev = next(model.parameters()).device
    metrics.update(bits_per_dim(model, cfg, xt[:ev.likelihood_images].to(dev), num_classes))
    if obj.head == "diag" and ev.calibration_images:
        metrics["calibration"] = calibrate(model, cfg, xt[:ev.calibration_images].to(dev), out)
    return metrics


def feature_classifier(cfg, test, train=None):
    """(classifier, features of the test images, its test accuracy): the FID feature classifier of the run's
    dataset (nets/classifier.py), trained on the training split once and cached in the data folder."""
    from .data import images as im
    from .nets.classifier import batched, load_or_train_classifier
    train = load_images(cfg.data, "train") if train is None or cfg.data.subset else train
    cache = im.data_dir(cfg.data.name) if cfg.data.name in ("mnist", "fashion-mnist") else \
        os.path.join(os.path.dirname(os.path.abspath(cfg.data.path)), ".gendiff-classifier")
    key = cfg.data.name if cfg.data.name in ("mnist", "fashion-mnist") else \
        "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in os.path.basename(cfg.data.path.rstrip("/")))
    xt = test.to_tensor()
    clf, info = load_or_train_classifier(key, train.to_tensor(), torch.from_numpy(train.labels), cache, xt,
                                         torch.from_numpy(test.labels), steps=cfg.eval.classifier_steps)
    clf.eval()
    with torch.no_grad():
        return clf, batched(clf.features, xt), info.get("test_accuracy")


def sample_metrics(clf, real: torch.Tensor, x: torch.Tensor, test, num_classes: int, seed: int,
                   labels: torch.Tensor | None = None) -> dict:
    """FID, precision/recall (against as many real test images, a fixed random subset), per-class counts and
    mode coverage of generated images x in the feature classifier's space; with `labels` (the class each
    sample was asked for) also label_accuracy, the share the classifier assigns to the asked class."""
    from .image_metrics import class_counts, fid, mode_coverage, precision_recall
    from .nets.classifier import batched
    with torch.no_grad():
        fake = batched(clf.features, x)
        g = torch.Generator().manual_seed(derive_seed(seed, "real-subset"))
        ref = real[torch.randperm(len(real), generator=g)[:len(fake)]]
        p, r = precision_recall(ref, fake)
        counts = class_counts(clf, x, num_classes)
        row = dict(fid=fid(real, fake), precision=p, recall=r, class_counts=counts.tolist(),
                   modes=mode_coverage(counts, torch.bincount(torch.from_numpy(test.labels),
                                                              minlength=num_classes).numpy()))
        if labels is not None:
            pred = batched(clf, x).argmax(1)
            row["label_accuracy"] = float((pred == labels.to(pred.device)).double().mean())
    return row


def bits_per_dim(model, cfg, x8: torch.Tensor, num_classes: int) -> dict:
    """Bits/dim of 8-bit test images (± the standard error over images): PF-ODE (T31, Hutchinson) of the
    dequantised images from σ_min (0.002 for EDM rows; σ̃_1 of the DDPM for DDPM rows, the lowest σ they were
    trained at), plus DDPM's discretised bound (T27) for DDPM rows (50 of the T − 1 diffusion steps, unbiased;
    the learned Σ for the v head). A conditional model is measured unconditionally (the null class ∅: p(x))."""
    from .guidance import Conditioned
    from .likelihood import ddpm_vlb, dequantize, log_likelihood, nll_8bit_to_bits_per_dim
    obj = OBJECTIVES[cfg.objective]
    if not len(x8):
        return {}
    den = Conditioned(model, torch.full((len(x8),), num_classes, device=x8.device)) if obj.conditional else model
    n, d = len(x8), x8[0].numel()
    se = lambda v: float(v.std() / math.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
    g = generator(cfg.seed, "likelihood")
    y = dequantize(x8.double(), generator=g).float()
    ddpm = _ddpm()
    sigma_min = float(ddpm.one_minus_alpha_bar[1] / ddpm.alpha_bar[1]) ** 0.5 if obj.density == "ddpm" else 0.002
    start = time.perf_counter()
    logp, info = log_likelihood(den, y, sigma_min=sigma_min, method="hutchinson", rtol=1e-4, atol=1e-4,
                                generator=g)
    bpd = nll_8bit_to_bits_per_dim(-logp.double(), d)
    out = {"bpd_pf_ode": float(bpd.mean()), "bpd_pf_ode_se": se(bpd), "bpd_pf_ode_nfe": info["nfe"],
           "bpd_pf_ode_sigma_min": sigma_min, "bpd_pf_ode_seconds": time.perf_counter() - start, "bpd_images": n}
    if obj.density == "ddpm":
        v = None
        if obj.head == "v":
            lg = _LastG(den, ddpm, model.head)
            den, v = lg, lg.v
        with torch.no_grad():
            vlb = ddpm_vlb(den, x8, ddpm, decoder="discretized", v=v, steps=50, generator=g)
        out.update(bpd_ddpm_bound=float(vlb["bits_per_dim"].mean()), bpd_ddpm_bound_se=se(vlb["bits_per_dim"]))
    return out


@torch.no_grad()
def calibrate(model, cfg, x0: torch.Tensor, out: str) -> dict:
    """The confidence head's claim about x0 against the actual error, on held-out images at several σ.

    q(x | x̃) = N(μ, σ_φ²) models a noisy sample x ~ N(x0, σ²) (T7), so its optimum is σ_φ² = σ² + E[(μ − x0)²]
    (T8): the std it predicts for the error of μ itself is the excess s_x0 = √(σ_φ² − σ²) (floored at 1e-4).
    Calibration (image_metrics.calibration) is of s_x0 against |μ − x0|; also recorded: the coverage of σ_φ
    itself, which counts the noise σ and must over-cover. uncertainty.png: noisy input, μ, s_x0, |μ − x0|, x0
    for 4 images at three σ."""
    from .image_metrics import calibration, uncertainty_grid
    g = generator(cfg.seed, "calibration")
    res, names = {}, []
    panels = {k: [] for k in ("noisy x̃", "denoised μ", "predicted std of x0", "|μ − x0|", "clean x0")}
    for s in CALIBRATION_SIGMAS:
        xn = x0 + s * torch.randn(x0.shape, generator=g).to(x0.device)
        p = model.predict(xn, torch.tensor(s, device=x0.device))
        var = p.variance().float()
        s_x0 = (var - s * s).clamp_min(1e-8).sqrt()
        c = calibration(s_x0.cpu(), p.mu.cpu(), x0.cpu())
        raw = calibration(var.sqrt().cpu(), p.mu.cpu(), x0.cpu())
        c.update(sigma_phi_coverage_1sigma=raw["coverage_1sigma"], excess_floored=float((var <= s * s).float().mean()))
        res[f"sigma={s:g}"] = c
        if s in (0.2, 0.5, 1.0):
            for k, v in zip(panels, (xn[:4].clamp(-1, 1), p.mu[:4], s_x0[:4], (p.mu - x0)[:4].abs(), x0[:4])):
                panels[k].append(v)
            names += [f"σ={s:g}"] * 4
    uncertainty_grid(os.path.join(out, "uncertainty.png"), {k: torch.cat(v).cpu() for k, v in panels.items()},
                     row_labels=names)
    return res


# ---- the table -----------------------------------------------------------------------------------------

SEED_004 = {"x0": (49.10, None), "eps": (15.75, 1.21), "score": (78.83, None), "score-cfg@w=1": (61.91, None),
            "score-cfg@w=5": (74.21, None), "learned-variance": (58.89, 1.10)}   # FID, NLL (bits/dim)


def run_table(base, rows, out: str, *, progress: bool = True, log=print, device: str | None = None) -> str:
    """Train and evaluate each row (objective) of seed 004's table at `base`'s budget into out/<row>/, a run folder
    each. Resumable: a row whose metrics.json exists for the same config is read; an unfinished row resumes from
    its newest checkpoint. Writes out/images.json and out/images.md; returns the markdown."""
    import json
    from dataclasses import replace
    from .config import to_toml
    from .run import start_run
    for r in rows:
        if r not in OBJECTIVES:
            raise ValueError(f"row {r!r} is not allowed; choose among {list(OBJECTIVES)}")
    results = {}
    for r in rows:
        cfg = replace(base, objective=r).validate()
        folder = os.path.join(out, r)
        done = os.path.join(folder, "metrics.json")
        if os.path.exists(os.path.join(folder, "config.toml")):
            with open(os.path.join(folder, "config.toml")) as f:
                if f.read() != to_toml(cfg):
                    raise ValueError(f"{folder} holds a run with another config; use another --out")
        else:
            start_run(cfg, folder)
        if os.path.exists(done):
            log(f"{r}: finished earlier, read {done}")
            with open(done) as f:
                results[r] = json.load(f)
            continue
        results[r] = train_image_run(cfg, folder, progress=progress, log=log, device=device)
    for r in results:   # throughput from the training log: every sitting of a resumed row, evaluation excluded
        results[r]["train_img_per_s"] = logged_img_per_s(os.path.join(out, r, "metrics.jsonl"), base.train.batch)
    save_json({"preset_config": to_toml(base), "rows": results}, os.path.join(out, "images.json"))
    md = table_markdown(results, base)
    from .io import save_text
    save_text(md, os.path.join(out, "images.md"))
    return md


def logged_img_per_s(path: str, batch: int) -> float:
    """Training images per second from a run's metrics.jsonl: Σ Δstep·batch / Σ Δseconds over consecutive lines of
    one sitting (seconds restart at 0 in each process, so a jump back marks a new sitting and is skipped)."""
    import json
    if not os.path.exists(path):
        return float("nan")
    with open(path) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    steps = secs = 0.0
    for a, b in zip(lines, lines[1:]):
        if b["seconds"] > a["seconds"] and b["step"] > a["step"]:
            steps, secs = steps + b["step"] - a["step"], secs + b["seconds"] - a["seconds"]
    return steps * batch / secs if secs else float("nan")


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def table_markdown(results: dict, base) -> str:
    t = base.train
    lines = [f"Seed 004's table on {base.data.name}: U-Net {base.model.model_channels}×{list(base.model.channel_mult)}, "
             f"{_as_list(base.model.num_blocks)} block(s)/level, {base.model.resample} resampling, {t.iterations} steps × batch {t.batch} ({t.precision}), "
             f"EMA {t.ema}; {base.eval.samples} samples per row; FID, precision and recall in our classifier's "
             "features (not Inception: compare orderings with seed 004, not values).", "",
             "Bits/dim of 8-bit test images ± standard error over the images (a conditional row: p(x) through the "
             "null class).", "",
             "| row | FID ↓ | precision | recall | classes hit | bits/dim PF-ODE | bits/dim DDPM bound | train img/s "
             "| sampler | NFE | seed 004 FID | seed 004 NLL |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, p=3: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"  # noqa: E731
    pm = lambda m, k: "–" if m.get(k) is None else f"{m[k]:.3f} ± {m.get(k + '_se') or 0:.3f}"  # noqa: E731
    for r, m in results.items():
        for key, s in m.items():
            if not key.startswith("samples"):
                continue
            name = r + key[len("samples"):]
            seed = SEED_004.get(name, (None, None))
            lines.append(f"| {name} | {f(s.get('fid'), 2)} | {f(s.get('precision'))} | {f(s.get('recall'))} | "
                         f"{s.get('modes', {}).get('classes_hit', '–')} | {pm(m, 'bpd_pf_ode')} | "
                         f"{pm(m, 'bpd_ddpm_bound')} | {f(m.get('train_img_per_s'), 1)} | {s['sampler']} | "
                         f"{s['nfe']} | {f(seed[0], 2)} | {f(seed[1], 2)} |")
    cal = [(r, m["calibration"]) for r, m in results.items() if "calibration" in m]
    if cal:
        lines += ["", "Calibration of the confidence head on held-out test images, per pixel. The std it predicts "
                  "for the error of μ is s_x0 = √(σ_φ² − σ²) (T8: σ_φ² = σ² + E[(μ − x0)²]). Spearman ρ(s_x0², "
                  "(μ − x0)²); coverage of ±1 s_x0 / ±2 s_x0 (ideal 68.3% / 95.4%); NLL gain of N(μ, s_x0²) over "
                  "the best single σ for all pixels (nats/pixel; > 0: s_x0 beats that trivial predictor); "
                  "floored: share of pixels with σ_φ ≤ σ (s_x0 set to 1e-4); ±1σ_φ: coverage of σ_φ itself.", "",
                  "| row | σ | Spearman | ±1 s_x0 | ±2 s_x0 | NLL gain | floored | ±1σ_φ |",
                  "|---|---|---|---|---|---|---|---|"]
        for r, c in cal:
            for s, v in c.items():
                lines.append(f"| {r} | {s.split('=')[1]} | {f(v['spearman'])} | {100 * v['coverage_1sigma']:.1f}% | "
                             f"{100 * v['coverage_2sigma']:.1f}% | {f(v['nll_gain'])} | "
                             f"{100 * v.get('excess_floored', float('nan')):.1f}% | "
                             f"{100 * v.get('sigma_phi_coverage_1sigma', float('nan')):.1f}% |")
    return "\n".join(lines) + "\n"
