"""`gendiff ablate`: the main experiment (seed document 000, THEORY §10) and the objectives grid, measured
against the exact ground truth of the 2-D tree.

A short script over library parts: each run of the suite is a toy recipe (recipes.TOY_RECIPES: head, training
mode, loss, score mode); it is trained on the tree (train.py), sampled unguided and autoguided with the EDM
Heun sampler, and scored by the `Evaluator` (mixture_eval.py); report.py writes tables and figures.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace

import torch

from ..checks import check_choice, check_positive
from ..data.sources import MODES, ToyBatches
from ..data.toy import TREE_CLASSES, tree
from ..guidance import Guided
from ..heads import make_head
from ..io import derive_seed, save_json
from ..losses import LOSSES
from ..mixture_eval import Evaluator, SamplerConfig
from ..precond import PRECONDS
from ..runtime import configure
from ..schedules import LogNormalSigma
from ..scores import HYBRID_SIGMA, SCORE_MODES, with_score_mode
from ..train import Outputs, train
from .config import ToyTrainConfig
from .recipes import MAIN_RUNS, TOY_RECIPES
from .report import guidance_effect, summarize_seeds, write_comparison, write_metrics, write_run_figure


GUIDES = ("snapshot", "small", "cfg")


@dataclass
class AblateConfig:
    runs: tuple = MAIN_RUNS
    classes: str = "A"
    seed: int = 0
    train: ToyTrainConfig = field(default_factory=ToyTrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    samples: int = 16384          # samples per metric evaluation
    eval_points: int = 16384      # held-out noisy points for score error and calibration
    guidance: float = 3.0         # w of T34
    guide: str = "snapshot"       # snapshot: same run at guide_iter; small: guide_width model at
    guide_iter: int = 1024        # guide_small_iter; cfg: like small but trained on classes "AB"
    guide_width: int = 32
    guide_small_iter: int = 512
    hybrid_sigma: float = HYBRID_SIGMA  # hybrid score mode: T14 below this σ, T13 above
    figures: bool = True

    def validate(self):
        """Every option checked before any training starts."""
        if not self.runs:
            raise ValueError("runs is empty; choose from " + ", ".join(TOY_RECIPES))
        for r in self.runs:
            check_choice("run", r, TOY_RECIPES)
        if len(set(self.runs)) != len(self.runs):
            raise ValueError(f"runs={list(self.runs)} names a run twice")
        check_choice("guide", self.guide, GUIDES)
        check_choice("classes", self.classes, TREE_CLASSES)
        derive_seed(self.seed, "check")
        for name in ("samples", "eval_points"):
            check_positive(name, getattr(self, name), integer=True)
            if getattr(self, name) < 2:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 2 (MMD², quantiles)")
        for name in ("guide_width", "guide_small_iter", "guide_iter"):
            check_positive(name, getattr(self, name), integer=True)
        check_positive("guidance", self.guidance, allow_zero=True)
        check_positive("hybrid_sigma", self.hybrid_sigma)
        self.sampler.validate()
        self.train.validate()
        if self.guide == "snapshot" and not 0 < self.guide_iter <= self.train.iterations:
            raise ValueError(f"guide_iter={self.guide_iter} must be in [1, "
                             f"iterations={self.train.iterations}]")
        for name in self.runs:  # the registry itself is checked too: a typo there fails here, not mid-suite
            spec = TOY_RECIPES[name]
            make_head(spec.head)
            check_choice("mode", spec.mode, MODES)
            check_choice("score_mode", spec.score_mode, SCORE_MODES)
            check_choice(f"run {name!r}: precond", spec.precond, PRECONDS)
            check_choice(f"run {name!r}: loss", spec.loss, (*LOSSES, "weighted"))
            spec.loss_fn(spec.density(self.train))
            if spec.model is not None:
                check_choice(f"run {name!r}: model", spec.model, TOY_RECIPES)
                owner = TOY_RECIPES[spec.model]
                what = lambda r: (r.head, r.mode, r.loss, r.precond, r.schedule, r.weighting)  # noqa: E731
                if what(owner) != what(spec):
                    raise ValueError(f"run {name!r} reuses model {spec.model!r} but declares head/mode/loss/"
                                     f"precond/schedule/weighting {what(spec)} != {what(owner)}")
        return self


def quick(cfg: AblateConfig | None = None) -> AblateConfig:
    """A few hundred iterations and smaller batches: for tests and a first look."""
    cfg = cfg or AblateConfig()
    t = replace(cfg.train, iterations=256, batch=1024, snapshot_every=64, lr_ref_iter=64)
    return replace(cfg, train=t, samples=2048, eval_points=2048, guide_iter=64, guide_small_iter=128)


def _train_model(name, spec, cfg, classes, seed, out_dir, progress, width=None, iterations=None):
    with torch.random.fork_rng():  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(derive_seed(seed, "init"))
        model = spec.build_model(cfg.train, width)
    tcfg = replace(cfg.train, width=width or cfg.train.width, iterations=iterations or cfg.train.iterations)
    source = ToyBatches(tree(classes), spec.mode, need_score=spec.loss == "score-matching")
    keep = (cfg.guide_iter,) if cfg.guide == "snapshot" else ()
    snap_dir = None if out_dir is None else os.path.join(out_dir, "snapshots", name)
    density = spec.density(cfg.train)
    return train(model, spec.loss_fn(density), source, tcfg, seed=seed, sigma_density=density,
                 outputs=Outputs(snapshot_dir=snap_dir, keep_snapshots=keep), progress=progress, desc=name)


def training_stats(res) -> dict:
    """The training loss as an estimator (T17, T20): its mean and the per-batch variance of the per-example
    loss over the last quarter of training and over the first 256 iterations."""
    n = len(res.losses)
    last, first = slice(n - max(n // 4, 1), n), slice(0, min(256, n))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"loss": mean(res.losses[last]), "loss_var": mean(res.loss_vars[last]),
            "loss_var_first": mean(res.loss_vars[first])}


def _guide_for(name, spec, cfg, res, seed, out_dir, progress):
    if cfg.guide == "snapshot":
        g = spec.build_model(cfg.train)
        g.load_state_dict(res.snapshots[cfg.guide_iter])
        return g.eval().requires_grad_(False), 0.0
    classes = "AB" if cfg.guide == "cfg" else cfg.classes
    gres = _train_model(f"{name}-guide", spec, cfg, classes, derive_seed(seed, "guide"), out_dir, progress,
                        width=cfg.guide_width, iterations=cfg.guide_small_iter)
    return gres.ema, gres.seconds


_EVALUATOR: dict = {}


def make_evaluator(cfg: AblateConfig) -> Evaluator:
    """The suite's Evaluator; the last one made is kept (a worker process scores several runs with it)."""
    key = repr((cfg.classes, cfg.seed, cfg.samples, cfg.eval_points, cfg.train.p_mean, cfg.train.p_std,
                cfg.sampler))
    if key not in _EVALUATOR:
        _EVALUATOR.clear()
        _EVALUATOR[key] = _new_evaluator(cfg)
    return _EVALUATOR[key]


def _new_evaluator(cfg: AblateConfig) -> Evaluator:
    return Evaluator(tree(cfg.classes), seed=cfg.seed, samples=cfg.samples, eval_points=cfg.eval_points,
                     sigma_density=LogNormalSigma(cfg.train.p_mean, cfg.train.p_std), sampler=cfg.sampler)


def _groups(cfg: AblateConfig) -> dict:
    """The trained models and the runs read from each: {owner: [run, …]} (a run with `model=` reuses its
    owner's network with another score mode), in the order of cfg.runs."""
    groups = {}
    for name in cfg.runs:
        groups.setdefault(TOY_RECIPES[name].model or name, []).append(name)
    return groups


def _run_group(cfg: AblateConfig, owner: str, names: list, out_dir, progress: bool) -> dict:
    """Train `owner` (and its guide), then sample and score every run in `names` unguided and autoguided.
    Everything random here has its own seeded generator, so the result does not depend on which process
    runs it or in what order (only on float rounding, which the thread count can change)."""
    ev = make_evaluator(cfg)
    spec = TOY_RECIPES[owner]
    res = _train_model(owner, spec, cfg, cfg.classes, cfg.seed, out_dir, progress)
    guide_model, guide_s = _guide_for(owner, spec, cfg, res, cfg.seed, out_dir, progress)
    out = {"owner": owner, "model": res.ema, "training": training_stats(res), "runs": {}, "figs": {},
           "timings": {}, "train_line": f"[{owner}] trained {res.seconds:.1f} s ({res.it_per_s:.1f} it/s)"}
    for i, name in enumerate(names):
        spec = TOY_RECIPES[name]
        main = with_score_mode(res.ema, spec.score_mode, cfg.hybrid_sigma)
        guide = with_score_mode(guide_model, spec.score_mode, cfg.hybrid_sigma)
        t_run = {"train_s": res.seconds, "it_per_s": res.it_per_s, "guide_train_s": guide_s} if i == 0 else {}
        runs, figs = {}, {}
        for label, den in (("unguided", main), ("autoguided", Guided(main, guide, cfg.guidance))):
            x, secs, traj = ev.sample(den, trace=len(ev.x_init))
            m = ev.sample_metrics(x)
            m.update(ev.score_errors(den))
            m["nfe"] = cfg.sampler.nfe * (1 if label == "unguided" or cfg.guidance in (0, 1) else 2)
            if label == "unguided" and spec.score_mode == "tweedie":
                m["calibration"] = ev.calibration(res.ema, spec.mode)
            runs[label] = m
            t_run[f"sample_s_{label}"] = secs
            figs[label] = (x, traj)
        out["runs"][name], out["figs"][name], out["timings"][name] = runs, figs, t_run
        if out_dir is not None and cfg.figures:      # here, so that worker processes draw them in parallel
            write_run_figure(name, cfg.guidance, ev, res.ema, spec, figs, out_dir)
    return out


def _worker_init(threads: int) -> None:
    configure(threads)


def pool_map(tasks, jobs: int, threads: int, on_done=lambda key, result: None) -> dict:
    """{key: fn(*args)} for tasks [(key, fn, args)], run by `jobs` spawned worker processes of `threads` torch
    threads each (spawn: no fork of an initialised OpenMP runtime); on_done(key, result) as each finishes.
    A task that raises stops everything at once (queued tasks cancelled, running workers terminated) and its
    exception is raised here, instead of after every other task has run."""
    ctx = torch.multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,))
    try:
        futures = {pool.submit(fn, *args): key for key, fn, args in tasks}
        out = {}
        for f in as_completed(futures):
            out[futures[f]] = f.result()
            on_done(futures[f], out[futures[f]])
    except BaseException:
        workers = list(getattr(pool, "_processes", {}).values())   # no public way to stop a running task
        pool.shutdown(wait=False, cancel_futures=True)
        for w in workers:
            w.terminate()
        raise
    pool.shutdown()
    return out


def _reference(cfg: AblateConfig) -> dict:
    return make_evaluator(cfg).reference()


def run_ablation(cfg: AblateConfig, out_dir: str | None = None, progress: bool = True, log=print,
                 jobs: int = 1, threads: int | None = None) -> dict:
    """Train, sample and evaluate every run of `cfg.runs`; write results into out_dir if given.

    jobs > 1: the trained models (and the reference rows) are independent tasks run by that many worker
    processes of `threads` torch threads each (default: this process's threads split between them). On a
    2-core CPU two 1-thread processes train ≈ 1.3× the steps per second of one 2-thread process
    (BENCHMARKS.md: most of a toy step is per-op overhead that a second thread does not shorten)."""
    cfg.validate()
    check_positive("jobs", jobs, integer=True)
    t_start = time.perf_counter()
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        save_json(config_to_dict(cfg), os.path.join(out_dir, "config.json"))  # resolved config, first
    groups = _groups(cfg)
    for owner in groups:
        log(f"[{owner}] training: {TOY_RECIPES[owner].help}")
    done = {}
    if jobs == 1:
        for owner, names in groups.items():
            done[owner] = _run_group(cfg, owner, names, out_dir, progress)
            _log_group(done[owner], log)
        reference = _reference(cfg)
    else:
        threads = threads or max(1, torch.get_num_threads() // jobs)
        # longest first (score matching computes the exact mixture score every step; then the models read by
        # several runs, one evaluation each), reference last
        order = sorted(groups, key=lambda o: (TOY_RECIPES[o].loss != "score-matching", -len(groups[o])))
        tasks = [(o, _run_group, (cfg, o, groups[o], out_dir, False)) for o in order]
        out = pool_map(tasks + [("reference", _reference, (cfg,))], jobs, threads,
                       lambda key, r: key == "reference" or _log_group(r, log))
        reference = out.pop("reference")
        done.update(out)
    owner_of = {n: o for o, ns in groups.items() for n in ns}
    runs = {n: done[owner_of[n]]["runs"][n] for n in cfg.runs}
    figs = {n: done[owner_of[n]]["figs"][n] for n in cfg.runs}
    timings = {"runs": {n: done[owner_of[n]]["timings"][n] for n in cfg.runs}}
    training = {o: done[o]["training"] for o in groups}
    timings["total_s"] = time.perf_counter() - t_start
    # one thread rounds differently from two (BENCHMARKS, issue 17): the split is part of what was run
    timings["jobs"], timings["threads_per_job"] = jobs, threads if jobs > 1 else torch.get_num_threads()
    result = {"runs": runs, "reference": reference, "guidance_effect": guidance_effect(runs),
              "training": training, "config": config_to_dict(cfg), "timings": timings}
    if out_dir is not None:
        write_metrics(result, out_dir)
        if cfg.figures:
            ref = Evaluator.reference_points(tree(cfg.classes), cfg.seed, cfg.samples)
            write_comparison(ref.float(), figs, out_dir)
    return result


def _log_group(g: dict, log) -> None:
    log(g["train_line"])
    for name, per in g["runs"].items():
        log(f"[{name}] " + "; ".join(f"{k}: median nll {v['median_nll']:.3f}, mmd {v['mmd']:.2e}"
                                     for k, v in per.items()))


def _finished(sub: str, cfg: AblateConfig):
    """A seed's earlier result, if it finished with this very config and code (a rerun skips it)."""
    path = os.path.join(sub, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return result if result.get("config") == json.loads(json.dumps(config_to_dict(cfg))) else None


def run_seeds(cfg: AblateConfig, seeds, out_dir: str | None = None, progress: bool = True, log=print,
              jobs: int = 1, threads: int | None = None) -> dict:
    """`run_ablation` once per seed (into out_dir/seed-<s>/) and a mean ± std summary in out_dir.
    Resumable: a seed whose folder already holds metrics.json for the same config is read, not rerun."""
    seeds = list(seeds)
    if len(seeds) == 1:
        return run_ablation(replace(cfg, seed=seeds[0]), out_dir, progress, log, jobs, threads)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds} has repeats; give distinct seeds")
    results = []
    for s in seeds:
        sub = None if out_dir is None else os.path.join(out_dir, f"seed-{s}")
        done = None if sub is None else _finished(sub, replace(cfg, seed=s))
        log(f"== seed {s}" + (" (finished earlier: read from metrics.json)" if done else ""))
        results.append(done or run_ablation(replace(cfg, seed=s), sub, progress, log, jobs, threads))
    summary = summarize_seeds(results)
    if out_dir is not None:
        write_metrics(summary, out_dir)
    return summary


def code_digest() -> str:
    """sha256 (first 16 hex) of the gendiff package's source: a resumed seed must come from the same code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # gendiff/, the library included
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    h.update(f.encode() + fh.read())
    return h.hexdigest()[:16]


def config_to_dict(cfg: AblateConfig) -> dict:
    d = asdict(cfg)
    d["code"] = code_digest()
    d["runs"] = list(cfg.runs)
    d["train"]["betas"] = list(cfg.train.betas)
    d["run_specs"] = {n: asdict(TOY_RECIPES[n]) for n in cfg.runs}
    return d
