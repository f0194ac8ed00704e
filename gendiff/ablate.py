"""The seed experiment (seed 000, THEORY §10), measured against the exact ground truth.

Trains each run of the suite on the 2-D tree, samples it unguided and autoguided with the EDM
Heun sampler, and scores every sample set against the exact mixture (metrics.py).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from . import losses
from .checks import check_choice, check_positive
from .data.toy import TREE_CLASSES, GaussianMixture, tree
from .guidance import Guided
from .io import derive_seed, generator, save_json
from .metrics import (calibration, kernel_sum, median_nll, mmd, outlier_rate, outlier_threshold, sample_nll, score_error,
                      score_error_by_sigma)
from .nets.mlp import ToyMLP
from .precond import Denoiser
from .samplers import edm_sigmas, heun_nfe, sample_heun
from .scores import denoiser_from_score, tweedie_score, with_score_mode
from .train import BatchSource, ToyTrainConfig, lognormal_sigma, train


@dataclass(frozen=True)
class RunSpec:
    head: str                    # confidence head: none | diag | full
    mode: str                    # training batches: point | source
    loss: str                    # key of losses.LOSSES
    score_mode: str = "tweedie"  # sampling score: T13 or T14
    model: str | None = None     # reuse the trained model of another run
    help: str = ""


RUNS = {
    "edm": RunSpec("none", "point", "nll", help="EDM baseline: the confidence loss with G ≡ 0 (T11)"),
    "confidence": RunSpec("diag", "point", "nll", help="diagonal σ_φ, point mode, Tweedie score (T9, T13)"),
    "confidence-full": RunSpec("full", "source", "nll-full", help="full covariance, source mode (T12)"),
    "confidence-full-phi-score": RunSpec("full", "source", "nll-full", "phi", model="confidence-full",
                                         help="model 3 sampled with the σ_φ score (T14), no retraining"),
    "score-matching": RunSpec("none", "point", "score-matching", help="exact score matching, weight σ² (§10)"),
    # Beyond the default suite:
    "confidence-phi-score": RunSpec("diag", "point", "nll", "phi", model="confidence",
                                    help="model 2 sampled with the σ_φ score (T14)"),
    "edm-textbook": RunSpec("none", "point", "edm", help="EDM loss with EDM's own λ(σ) weighting"),
}
DEFAULT_RUNS = ("edm", "confidence", "confidence-full", "confidence-full-phi-score", "score-matching")
GUIDES = ("snapshot", "small", "cfg")


@dataclass
class AblateConfig:
    runs: tuple = DEFAULT_RUNS
    classes: str = "A"
    seed: int = 0
    train: ToyTrainConfig = field(default_factory=ToyTrainConfig)
    samples: int = 16384          # samples per metric evaluation
    eval_points: int = 16384      # held-out noisy points for score error and calibration
    steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float = 5.0
    rho: float = 7.0
    churn: float = 0.0
    guidance: float = 3.0         # w of T34
    guide: str = "snapshot"       # snapshot: same run at guide_iter; small: guide_width model at
    guide_iter: int = 1024        # guide_small_iter; cfg: like small but trained on classes "AB"
    guide_width: int = 32
    guide_small_iter: int = 512
    figures: bool = True

    def validate(self):
        """Every option checked before any training starts."""
        if not self.runs:
            raise ValueError("runs is empty; choose from " + ", ".join(RUNS))
        for r in self.runs:
            check_choice("run", r, RUNS)
        if len(set(self.runs)) != len(self.runs):
            raise ValueError(f"runs={list(self.runs)} names a run twice")
        check_choice("guide", self.guide, GUIDES)
        check_choice("classes", self.classes, TREE_CLASSES)
        derive_seed(self.seed, "check")
        for name in ("samples", "eval_points"):
            check_positive(name, getattr(self, name), integer=True)
            if getattr(self, name) < 2:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 2 (MMD², quantiles)")
        for name in ("steps", "guide_width", "guide_small_iter", "guide_iter"):
            check_positive(name, getattr(self, name), integer=True)
        check_positive("guidance", self.guidance, allow_zero=True)
        check_positive("churn", self.churn, allow_zero=True)
        edm_sigmas(self.steps, self.sigma_min, self.sigma_max, self.rho)
        self.train.validate()
        if self.guide == "snapshot" and not 0 < self.guide_iter <= self.train.iterations:
            raise ValueError(f"guide_iter={self.guide_iter} must be in [1, iterations={self.train.iterations}]")
        return self


def quick(cfg: AblateConfig | None = None) -> AblateConfig:
    """A few hundred iterations and smaller batches: for tests and a first look."""
    cfg = cfg or AblateConfig()
    t = replace(cfg.train, iterations=256, batch=1024, snapshot_every=64, lr_ref_iter=64)
    return replace(cfg, train=t, samples=2048, eval_points=2048, guide_iter=64, guide_small_iter=128)


def make_denoiser(spec: RunSpec, cfg: AblateConfig, width: int | None = None) -> Denoiser:
    net = ToyMLP(dim=2, width=width or cfg.train.width, hidden_layers=cfg.train.hidden_layers, head=spec.head)
    return Denoiser(net, cfg.train.sigma_data, spec.head)


def _train_model(name, spec, cfg, classes, seed, out_dir, progress, width=None, iterations=None):
    with torch.random.fork_rng():  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(derive_seed(seed, "init"))
        model = make_denoiser(spec, cfg, width)
    tcfg = replace(cfg.train, width=width or cfg.train.width, iterations=iterations or cfg.train.iterations)
    source = BatchSource(tree(classes), spec.mode, need_score=spec.loss == "score-matching")
    keep = (cfg.guide_iter,) if cfg.guide == "snapshot" else ()
    snap_dir = None if out_dir is None else os.path.join(out_dir, "snapshots", name)
    res = train(model, losses.LOSSES[spec.loss](), source, tcfg, seed=seed, snapshot_dir=snap_dir,
                keep_snapshots=keep, progress=progress, desc=name)
    return res


def _guide_for(name, spec, cfg, res, seed, out_dir, progress):
    if cfg.guide == "snapshot":
        g = make_denoiser(spec, cfg)
        g.load_state_dict(res.snapshots[cfg.guide_iter])
        return g.eval().requires_grad_(False), 0.0
    classes = "AB" if cfg.guide == "cfg" else cfg.classes
    gres = _train_model(f"{name}-guide", spec, cfg, classes, derive_seed(seed, "guide"), out_dir, progress,
                        width=cfg.guide_width, iterations=cfg.guide_small_iter)
    return gres.ema, gres.seconds


class ExactDenoiser(torch.nn.Module):
    """The posterior mean E[x0 | x̃] of the ground truth: the Heun sampler's floor (Tweedie, T13)."""

    def __init__(self, gt: GaussianMixture):
        super().__init__()
        self.gt = gt

    def forward(self, x, sigma):
        return denoiser_from_score(self.gt.score(x, float(sigma)), x, float(sigma))


def sample(denoiser, cfg: AblateConfig, x_init: torch.Tensor, trace: int = 0):
    """Heun sampling from x_init at σ_max; returns samples, seconds and a [steps + 1, trace, 2] trajectory."""
    sigmas = edm_sigmas(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    traj = [x_init[:trace].clone()]
    t0 = time.perf_counter()
    out = sample_heun(denoiser, x_init, sigmas, churn=cfg.churn, generator=generator(cfg.seed, "churn"),
                      callback=(lambda i, x, s, d: traj.append(x[:trace].clone())) if trace else None)
    return out, time.perf_counter() - t0, torch.stack(traj)


class Evaluator:
    """Fixed ground-truth sets, held-out noisy points and initial noise shared by every run."""

    def __init__(self, cfg: AblateConfig):
        self.cfg, self.gt = cfg, tree(cfg.classes)
        # one generator per purpose: changing --samples leaves the held-out points unchanged
        self.x_init, _ = self.gt.sample(cfg.samples, cfg.sigma_max, generator=generator(cfg.seed, "x_init"))
        self.ref, _ = self.gt.sample(cfg.samples, generator=generator(cfg.seed, "reference"), dtype=torch.float64)
        self.ref_self = kernel_sum(self.ref, self.ref, True)
        self.threshold = outlier_threshold(self.gt, seed=derive_seed(cfg.seed, "outlier-threshold"))
        g = generator(cfg.seed, "held-out")
        x0, _ = self.gt.sample(cfg.eval_points, generator=g, dtype=torch.float64)
        self.sigma = lognormal_sigma(cfg.eval_points, cfg.train.p_mean, cfg.train.p_std, g).double()
        self.x_noisy = x0 + self.sigma[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        self.exact_score = self.gt.score(self.x_noisy, self.sigma)
        self._posteriors = {}  # mode -> exact posterior of the held-out points (shared by runs)

    def sample_metrics(self, samples: torch.Tensor) -> dict:
        """Sample NLL and MMD² over the finite samples; diverged (non-finite) ones are counted apart
        and as outliers, so one blown-up trajectory does not turn every number into NaN."""
        finite = torch.isfinite(samples).all(1)
        ok = samples[finite]
        return {
            "sample_nll": sample_nll(ok, self.gt) if len(ok) else float("nan"),
            "median_nll": median_nll(ok, self.gt) if len(ok) else float("nan"),
            "outlier_rate": outlier_rate(samples, self.gt, self.threshold),
            "mmd": mmd(ok, self.ref, self.ref_self) if len(ok) > 1 else float("nan"),
            "nonfinite": float((~finite).double().mean()),
        }

    def score_errors(self, denoiser) -> dict:
        """σ²-weighted score error over the held-out points, overall and per σ range."""
        x = self.x_noisy.float()
        with torch.no_grad():
            mu = torch.cat([denoiser(xc, sc[:, None]) for xc, sc in
                            zip(x.split(4096), self.sigma.float().split(4096))])
        s = tweedie_score(mu.double(), self.x_noisy, self.sigma[:, None])
        return {"score_error": score_error(s, self.exact_score, self.sigma),
                "score_error_by_sigma": score_error_by_sigma(s, self.exact_score, self.sigma)}

    def calibration(self, model: Denoiser, spec: RunSpec) -> dict:
        x, sig = self.x_noisy.float(), self.sigma.float()
        with torch.no_grad():
            pred = model.predict(x, sig[:, None])
            s2 = self.sigma.square()
            # exact optimum of the run's mode: point T8 (σ² + Cov[x0 | x̃]); source T12 (σ²I + E[Σ_k] + Cov[m_k])
            if spec.mode not in self._posteriors:
                fn = self.gt.source_posterior if spec.mode == "source" else self.gt.posterior
                self._posteriors[spec.mode] = fn(self.x_noisy, self.sigma)
            post = self._posteriors[spec.mode]
            if spec.head == "full":
                floor = s2[:, None, None] * torch.eye(2, dtype=s2.dtype)
                learned, excess = pred.covariance(), post.cov
            else:
                floor = s2[:, None].expand(-1, 2)
                learned, excess = pred.sigma_phi.square(), torch.diagonal(post.cov, dim1=-2, dim2=-1)
        return calibration(learned, floor + excess, floor)

    def reference(self) -> dict:
        other, _ = self.gt.sample(self.cfg.samples, generator=generator(self.cfg.seed, "second-reference"),
                                  dtype=torch.float64)
        exact, _secs, _ = sample(ExactDenoiser(self.gt), self.cfg, self.x_init.double())
        return {
            "ground-truth": {**self.sample_metrics(other), "score_error": 0.0, "nfe": 0},
            "exact-denoiser": {**self.sample_metrics(exact), "score_error": 0.0,
                               "nfe": heun_nfe(self.cfg.steps)},
        }


def run_ablation(cfg: AblateConfig, out_dir: str | None = None, progress: bool = True, log=print) -> dict:
    """Train, sample and evaluate every run of `cfg.runs`; write results into out_dir if given."""
    cfg.validate()
    t_start = time.perf_counter()
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        save_json(config_to_dict(cfg), os.path.join(out_dir, "config.json"))  # resolved config, first
    ev = Evaluator(cfg)
    models, guides, timings, runs, figs = {}, {}, {"runs": {}}, {}, {}
    for name in cfg.runs:
        spec = RUNS[name]
        owner = spec.model or name
        t_run = {}
        if owner not in models:
            log(f"[{owner}] training: {RUNS[owner].help}")
            res = _train_model(owner, RUNS[owner], cfg, cfg.classes, cfg.seed, out_dir, progress)
            models[owner] = res.ema
            guides[owner], guide_s = _guide_for(owner, RUNS[owner], cfg, res, cfg.seed, out_dir, progress)
            t_run.update(train_s=res.seconds, it_per_s=res.it_per_s, guide_train_s=guide_s,
                         final_loss=sum(res.losses[-64:]) / len(res.losses[-64:]))
        model = models[owner]
        main = with_score_mode(model, spec.score_mode)
        guide = with_score_mode(guides[owner], spec.score_mode)
        runs[name], figs[name] = {}, {}
        for label, den in (("unguided", main), ("autoguided", Guided(main, guide, cfg.guidance))):
            x, secs, traj = sample(den, cfg, ev.x_init, trace=len(ev.x_init))
            m = ev.sample_metrics(x)
            m.update(ev.score_errors(den))
            m["nfe"] = heun_nfe(cfg.steps) * (1 if label == "unguided" or cfg.guidance in (0, 1) else 2)
            if label == "unguided" and spec.head != "none":
                m["calibration"] = ev.calibration(model, spec)
            runs[name][label] = m
            t_run[f"sample_s_{label}"] = secs
            figs[name][label] = (x, traj)
        timings["runs"][name] = t_run
        log(f"[{name}] " + "; ".join(f"{k}: nll {v['sample_nll']:.3f}, mmd {v['mmd']:.2e}" for k, v in runs[name].items()))
    reference = ev.reference()
    timings["total_s"] = time.perf_counter() - t_start
    result = {"runs": runs, "reference": reference, "config": config_to_dict(cfg), "timings": timings}
    if out_dir is not None:
        from .report import write_figures, write_metrics
        write_metrics(result, out_dir)
        if cfg.figures:
            write_figures(cfg, ev, models, figs, out_dir)
    return result


def run_seeds(cfg: AblateConfig, seeds, out_dir: str | None = None, progress: bool = True, log=print) -> dict:
    """`run_ablation` once per seed (into out_dir/seed-<s>/) and a mean ± std summary in out_dir."""
    seeds = list(seeds)
    if len(seeds) == 1:
        return run_ablation(replace(cfg, seed=seeds[0]), out_dir, progress, log)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds} has repeats; give distinct seeds")
    from .report import summarize_seeds, write_metrics
    results = []
    for s in seeds:
        log(f"== seed {s}")
        sub = None if out_dir is None else os.path.join(out_dir, f"seed-{s}")
        results.append(run_ablation(replace(cfg, seed=s), sub, progress, log))
    summary = summarize_seeds(results)
    if out_dir is not None:
        write_metrics(summary, out_dir)
    return summary


def config_to_dict(cfg: AblateConfig) -> dict:
    d = asdict(cfg)
    d["runs"] = list(cfg.runs)
    d["train"]["betas"] = list(cfg.train.betas)
    return d
