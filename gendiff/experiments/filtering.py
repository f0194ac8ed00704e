"""The BayesDiff test on an image run (issue 18, Build 5): does dropping the samples the model itself is least
sure of improve what is kept, beyond what dropping as many at random does?

Per seed: N images from the run's sampler, each scored on the way by its own excess variance
(uncertainty.ExcessVarianceScore: the mean of σ_φ² − σ² over pixels and over the steps with σ in a range;
T8), the most uncertain `fraction` dropped (uncertainty.keep_most_certain), and FID / precision / recall of
what is kept (images.sample_metrics, the run's feature classifier as in `gendiff eval`) against R random
subsets of the same size, drawn from the same N images (seeded). Per metric: the random subsets' mean ± sd
and whether the filtered value beats their mean by more than that sd; over several seeds, the gain's mean
± sd across seeds. Also the class counts of what was dropped. `gendiff eval RUN --filter 0.1`.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..heads import make_head
from ..image_metrics import class_counts, image_grid
from ..io import generator, save_json
from ..uncertainty import SCORE_SIGMAS, ExcessVarianceScore, keep_most_certain
from .config import ImageRunConfig
from .images import _refuse_sampler, classifier_metrics, eval_inputs, sample_images, sample_metrics
from .recipes import IMAGE_RECIPES
from .runfolder import refuse, weights_tag

FILTER_SUBSETS = 10                       # random subsets per seed
METRICS = {"fid": -1, "precision": 1, "recall": 1}   # metric → sign of "better" (FID: lower)


def sample_scored(model, cfg: ImageRunConfig, n: int, *, seed: int = 0, steps: int = 0, batch: int = 0,
                  sigmas=SCORE_SIGMAS, labels=None, w: float | None = None, num_classes: int = 0):
    """(images [N, C, H, W], scores [N], info) of images.sample_images with each image's excess-variance score
    (uncertainty.ExcessVarianceScore over σ in `sigmas`), from the same network evaluations (the same NFE).
    Image i's score, like the image, comes from its own generator: it does not depend on the batch split."""
    recorders = []

    def wrap(den):
        recorders.append(ExcessVarianceScore(den, *sigmas))
        return recorders[-1]
    x, info = sample_images(model, cfg, n, labels=labels, w=w, seed=seed, num_classes=num_classes,
                            steps=steps, batch=batch, wrap=wrap)
    scores = torch.cat([r.scores().cpu() for r in recorders])
    return x, scores, {**info, "score_sigmas": recorders[0].sigmas}


def random_subsets(n: int, k: int, count: int, seed: int) -> list:
    """`count` subsets of k of the indices 0 … n − 1, each without repeats (ascending), from the generator of
    (seed, 'filter-random'): the same seed gives the same subsets."""
    g = generator(seed, "filter-random")
    return [torch.randperm(n, generator=g)[:k].sort().values for _ in range(count)]


def against_random(filtered: dict, rows: list) -> dict:
    """Per metric of METRICS: the random subsets' values, mean and sd (n − 1), the filtered value, its gain
    over the random mean (positive: better; FID lower), and `beats_random`: gain > sd."""
    out = {}
    for name, sign in METRICS.items():
        v = np.array([r[name] for r in rows], dtype=float)
        mean, sd = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")
        gain = sign * (filtered[name] - mean)
        out[name] = {"filtered": filtered[name], "random_mean": mean, "random_sd": sd,
                     "random": v.tolist(), "gain": gain, "beats_random": bool(gain > sd)}
    return out


def over_seeds(per_seed: list) -> dict:
    """Per metric: the gain over random (against_random) across seeds, its mean and sd (n − 1), how many seeds
    beat random by more than their subsets' sd, and `beats_random_by_more_than_the_seed_spread`: mean gain >
    its sd across seeds (None with one seed)."""
    out = {}
    for name in METRICS:
        g = np.array([s["versus_random"][name]["gain"] for s in per_seed], dtype=float)
        sd = float(g.std(ddof=1)) if len(g) > 1 else float("nan")
        out[name] = {"gain_mean": float(g.mean()), "gain_sd": sd,
                     "seeds_beating_random": int(sum(s["versus_random"][name]["beats_random"]
                                                     for s in per_seed)),
                     "beats_random_by_more_than_the_seed_spread": bool(g.mean() > sd) if len(g) > 1 else None}
    return out


def _one_seed(x, scores, fraction, subsets: int, seed: int, clf, real, test) -> dict:
    """The test on one seed's images x and scores: kept and dropped, metrics of all, of the kept and of the
    random subsets (images.sample_metrics), the comparison, the dropped images' class counts."""
    k = test.num_classes
    kept, dropped = keep_most_certain(scores, fraction)
    filtered = sample_metrics(clf, real, x[kept], test, k, seed)
    rand = [sample_metrics(clf, real, x[i], test, k, seed) for i in random_subsets(len(x), len(kept), subsets,
                                                                                   seed)]
    with torch.no_grad():
        dropped_counts = class_counts(clf, x[dropped], k).tolist()
    return {"seed": seed, "all": sample_metrics(clf, real, x, test, k, seed), "filtered": filtered,
            "versus_random": against_random(filtered, rand), "dropped_class_counts": dropped_counts,
            "dropped_indices": dropped.tolist(), "scores": scores.tolist()}


def _check(fraction, subsets: int, sigmas, seeds) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"--filter={fraction!r} must be a number in (0, 1): the share of samples dropped "
                         "(e.g. 0.1)")
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 2:
        raise ValueError(f"--filter-subsets={subsets!r} must be an integer >= 2 (the random subsets' sd "
                         "needs two)")
    lo, hi = sigmas
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"--filter-sigmas={lo!r},{hi!r} must be two numbers 0 < lo < hi (the σ range of the "
                         f"score; default {SCORE_SIGMAS[0]:g},{SCORE_SIGMAS[1]:g})")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds={list(seeds)!r} must be distinct seeds, at least one")


def filter_run(out: str, cfg, model, *, fraction: float = 0.1, samples: int = 0, steps: int = 0,
               seeds=(0,), subsets: int = FILTER_SUBSETS, sigmas=SCORE_SIGMAS,
               cfg_weight: float | None = None, weights: str = "model.safetensors", sampler=None,
               score_mode=None, **unused) -> dict:
    """The BayesDiff test (module docstring) for each seed of `seeds`, `samples` images each (default
    eval.samples); writes RUN/filter-<fraction>-<steps>-<n>-seed<s>[...].json (a list of seeds: seeds<a-b>)
    and, for the first seed, the 64 most uncertain and the 64 most certain images as …-dropped.png and
    …-kept.png (most uncertain / most certain first). Refuses toy runs and runs without a learned confidence
    (has_confidence: diag, excess, sigma-only heads)."""
    if not isinstance(cfg, ImageRunConfig):
        refuse({"filter": fraction}, f"a {cfg.kind}", " (the BayesDiff test filters generated images by "
                                                     "the confidence head; use an image run)")
    _refuse_sampler(cfg, {"sampler": sampler, "score_mode": score_mode, **unused})
    recipe = IMAGE_RECIPES[cfg.recipe]
    if not make_head(recipe.head).has_confidence:
        ok = [k for k, r in IMAGE_RECIPES.items() if make_head(r.head).has_confidence]
        raise ValueError(f"--filter needs a run with a learned confidence σ_φ; recipe={cfg.recipe!r} has "
                         f"head={recipe.head!r}, which has none (recipes with one: {', '.join(ok)})")
    seeds = list(seeds)
    sigmas = tuple(float(s) for s in sigmas)
    _check(fraction, subsets, sigmas, seeds)
    n, test, (clf, real, acc), labels = eval_inputs(cfg, samples, cfg_weight, "--filter")
    k = test.num_classes
    tag = (f"filter-{fraction:g}-{(steps or cfg.eval.sampler_steps) or 'default'}-{n}-"
           + (f"seed{seeds[0]}" if len(seeds) == 1 else "seeds" + "-".join(map(str, seeds)))
           + ("" if cfg_weight is None else f"-w{cfg_weight:g}")
           + ("" if sigmas == SCORE_SIGMAS else f"-sigmas{sigmas[0]:g}-{sigmas[1]:g}") + weights_tag(weights))
    per_seed, info = [], {}
    for seed in seeds:
        x, scores, info = sample_scored(model, cfg, n, seed=seed, steps=steps, sigmas=sigmas, labels=labels,
                                        w=cfg_weight, num_classes=k)
        per_seed.append(_one_seed(x, scores, fraction, subsets, seed, clf, real, test))
        per_seed[-1].update(score_sigmas=info["score_sigmas"], sample_seconds=info["sample_seconds"])
        if seed == seeds[0]:
            order = torch.argsort(scores, descending=True, stable=True)
            image_grid(os.path.join(out, tag + "-dropped.png"), x[order[:64]], nrow=8)
            image_grid(os.path.join(out, tag + "-kept.png"), x[order.flip(0)[:64]], nrow=8)
    dropped = len(per_seed[0]["dropped_indices"])
    m = {"fraction": fraction, "samples": n, "kept": n - dropped, "dropped": dropped,
         "subsets": subsets, "seeds": seeds, "sampler": info["sampler"], "nfe": info["nfe"],
         "cfg_weight": cfg_weight, "weights": weights,
         "score": {"sigma_range": list(sigmas),
                   "definition": "per image: mean over pixels and over the sampler's steps with σ in "
                                 "sigma_range of max(σ_φ² − σ², 0) (T8: Var[x0 | x̃]); higher = less sure"},
         **classifier_metrics(acc, k), "per_seed": per_seed, "over_seeds": over_seeds(per_seed)}
    save_json(m, os.path.join(out, tag + ".json"))
    return m


def filter_summary(out: str, m: dict) -> str:
    flag = " (UNRELIABLE: the classifier is near chance)" if m["sample_metrics_unreliable"] else ""
    lines = [f"{out}: {m['sampler']} NFE {m['nfe']}, {m['samples']} samples per seed, the "
             f"{m['dropped']} most uncertain dropped, {m['kept']} kept against {m['subsets']} random subsets "
             f"of {m['kept']}{flag}"]
    for s in m["per_seed"]:
        v = s["versus_random"]
        verdict = {True: "better by more than the sd", False: "not"}
        lines.append(f"  seed {s['seed']}: " + "; ".join(
            f"{name} {v[name]['filtered']:.4g} vs random {v[name]['random_mean']:.4g} ± "
            f"{v[name]['random_sd']:.2g} ({verdict[v[name]['beats_random']]})" for name in METRICS)
            + f"; dropped per class {s['dropped_class_counts']}")
    if len(m["per_seed"]) > 1:
        o = m["over_seeds"]
        lines.append("  over seeds, gain over random (> 0 better): " + "; ".join(
            f"{name} {o[name]['gain_mean']:.4g} ± {o[name]['gain_sd']:.2g} "
            f"({'beyond' if o[name]['beats_random_by_more_than_the_seed_spread'] else 'within'} the seed "
            "spread)" for name in METRICS))
    return "\n".join(lines)
