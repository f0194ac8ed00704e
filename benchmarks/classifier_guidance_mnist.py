"""Classifier guidance (THEORY T32) on MNIST: an unconditional EDM denoiser steered by a noise-aware
classifier.

1. The denoiser: the image table's `edm` row recipe (mnist-cpu preset, recipe edm), trained in OUT/denoiser
   through gendiff's image loop (skipped when that folder holds model.safetensors); or --denoiser RUN, any
   finished unconditional image run folder.
2. The classifier: `nets.unet.NoisyClassifier` (the U-Net's embedding, encoder and middle + a pooled linear
   read-out, ADM's EncoderUNetModel) trained by `guidance.train_noisy_classifier` on x0 + σε of the training
   split, σ from the denoiser's training density; saved as OUT/noisy-classifier.safetensors
   (reused when there). Its test accuracy at several σ is reported against chance (10%).
3. For each guidance weight w: `image_runs.sample_images` (Heun 18, the row's sampler) with
   `guidance.ClassifierGuided` (D + w·σ²·∇ log p_σ(y | x)), labels 0…9 in turn; measured in the FID
   classifier's features (FID, precision, recall, classes hit) plus label accuracy: the share of samples the
   FID classifier (a separate network, 99.4% on clean test digits) assigns to the class asked for. w = 0 is
   the unguided model: its label accuracy is the chance baseline.

Resumable: each finished w is stored in OUT/results.json with the recipe (denoiser folder, classifier recipe,
number of samples) and skipped on a rerun of the same recipe; another recipe starts the table afresh.

Usage: python benchmarks/classifier_guidance_mnist.py [--out docs/results/classifier-guidance]
       [--denoiser RUN] [--weights 0,1,2,4] [--samples 1000] [--classifier-steps 1500] [--threads N]
"""
import argparse
import json
import os
import time

import torch

from gendiff.experiments.config import resolve, to_toml
from gendiff.guidance import ClassifierGuided, train_noisy_classifier
from gendiff.image_metrics import image_grid
from gendiff.experiments.images import (feature_classifier, load_images, prepare, sample_images,
                                        sample_metrics, train_run)
from gendiff.experiments.kinds import load_run
from gendiff.io import save_json, save_state, save_text
from gendiff.nets.unet import NoisyClassifier
from gendiff.runtime import configure
from gendiff.schedules import LogNormalSigma

CLASSIFIER = dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(7,))
TEST_SIGMAS = (0.1, 0.5, 1.0, 2.0, 5.0)


def denoiser(out: str, run: str | None, samples: int):
    if run is None:
        run = os.path.join(out, "denoiser")
        cfg = resolve("mnist-cpu", sets=["recipe=edm", f"eval.samples={samples}", "eval.likelihood_images=0"])
        os.makedirs(run, exist_ok=True)
        path = os.path.join(run, "config.toml")
        if os.path.exists(path) and open(path).read() != to_toml(cfg):
            raise SystemExit(f"{run} holds another recipe (config.toml differs): use another --out")
        if not os.path.exists(path):
            save_text(to_toml(cfg), path)
        if not os.path.exists(os.path.join(run, "model.safetensors")):
            print(f"== training the denoiser in {run}", flush=True)
            train_run(cfg, run, prepare(cfg), progress=False)
    cfg, model = load_run(run)
    if cfg.recipe not in ("edm", "confidence"):
        raise SystemExit(f"--denoiser {run}: recipe {cfg.recipe!r}; classifier guidance here needs an "
                         "unconditional EDM-sampled run (edm or confidence)")
    return cfg, model


def classifier(out: str, cfg, train, test, steps: int, batch: int) -> tuple[NoisyClassifier, dict]:
    from safetensors.torch import load_file
    path, record = (os.path.join(out, "noisy-classifier.safetensors"),
                    os.path.join(out, "noisy-classifier.json"))
    recipe = dict(net=CLASSIFIER, steps=steps, batch=batch, lr=2e-3, seed=0, p_mean=cfg.train.p_mean,
                  p_std=cfg.train.p_std, sigma_data=cfg.train.sigma_data)
    torch.manual_seed(0)
    clf = NoisyClassifier(classes=train.num_classes, sigma_data=cfg.train.sigma_data, **CLASSIFIER)
    info = json.load(open(record)) if os.path.exists(record) else None
    if info is not None and info["recipe"] == json.loads(json.dumps(recipe)) and os.path.exists(path):
        clf.load_state_dict(load_file(path))
        return clf.eval(), info
    print(f"== training the noise-aware classifier ({steps} steps × {batch})", flush=True)
    start = time.perf_counter()
    losses = train_noisy_classifier(clf, train.to_tensor(), torch.from_numpy(train.labels),
                                    LogNormalSigma(cfg.train.p_mean, cfg.train.p_std), steps=steps,
                                    batch=batch, lr=recipe["lr"], seed=recipe["seed"])
    xt, yt = test.to_tensor(), torch.from_numpy(test.labels)
    g = torch.Generator().manual_seed(1)
    acc = {}
    with torch.no_grad():
        for s in TEST_SIGMAS:
            noisy = xt + s * torch.randn(xt.shape, generator=g)
            pred = torch.cat([clf(noisy[i:i + 1000], s).argmax(1) for i in range(0, len(xt), 1000)])
            acc[f"sigma={s:g}"] = float((pred == yt).double().mean())
    info = dict(recipe=recipe, train_seconds=time.perf_counter() - start, final_loss=sum(losses[-50:]) / 50,
                test_accuracy=acc, parameters=sum(p.numel() for p in clf.parameters()))
    save_state(clf.state_dict(), path)
    save_json(info, record)
    return clf, info


def markdown(results: dict, info: dict, cfg) -> str:
    acc = ", ".join(f"σ = {k.split('=')[1]}: {100 * v:.1f}%" for k, v in info["test_accuracy"].items())
    sampler = next(iter(results.values()))["sampler"] if results else "?"
    lines = [f"Classifier guidance (T32) on MNIST: the `edm` row's recipe ({cfg.train.iterations} steps × "
             f"batch {cfg.train.batch}, U-Net {cfg.model.model_channels}×{list(cfg.model.channel_mult)}) "
             f"steered by a NoisyClassifier ({info['parameters'] / 1e6:.2f} M parameters, "
             f"{info['recipe']['steps']} steps × {info['recipe']['batch']}; test accuracy on noised digits "
             f"{acc}; chance 10%). Samples: {sampler}, labels 0…9 in turn; metrics in the FID classifier's "
             "features; label accuracy = share of samples the FID classifier assigns to the class asked for "
             "(chance: 10%).", "",
             "| w | label accuracy | FID ↓ | precision | recall | classes hit | NFE | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(results, key=lambda k: float(k.split("=")[1])):
        r = results[key]
        lines.append(f"| {key.split('=')[1]} | {100 * r['label_accuracy']:.1f}% | {r['fid']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['modes']['classes_hit']} | {r['nfe']} | "
                     f"{r['sample_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/classifier-guidance")
    ap.add_argument("--denoiser", default=None,
                    help="a finished unconditional image run folder (default: train the edm row's recipe "
                         "in OUT/denoiser)")
    ap.add_argument("--weights", default="0,1,2,4")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--classifier-batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    configure(args.threads)
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        ap.error(f"--weights={args.weights!r} must be comma-separated numbers, e.g. 0,1,2,4")
    os.makedirs(args.out, exist_ok=True)
    cfg, model = denoiser(args.out, args.denoiser, args.samples)
    train, test = load_images(cfg.data, "train"), load_images(cfg.data, "test")
    clf, info = classifier(args.out, cfg, train, test, args.classifier_steps, args.classifier_batch)
    clf.requires_grad_(False)
    fid_clf, real, _ = feature_classifier(cfg, test, train)
    path = os.path.join(args.out, "results.json")
    recipe = dict(denoiser=os.path.abspath(args.denoiser or os.path.join(args.out, "denoiser")),
                  classifier=info["recipe"], samples=args.samples)
    stored = json.load(open(path)) if os.path.exists(path) else {}
    if stored and stored.get("recipe") != json.loads(json.dumps(recipe)):
        print("results.json was made with another recipe (denoiser, classifier or samples): starting afresh")
        stored = {}
    results = stored.get("rows", {})
    labels = torch.arange(args.samples) % train.num_classes
    for w in weights:
        key = f"w={w:g}"
        if key in results:
            continue
        print(f"== sampling with {key}", flush=True)
        x, row = sample_images(model, cfg, args.samples, labels=labels, seed=cfg.seed,
                               guide=lambda d, y: ClassifierGuided(d, clf, y, w))
        row.update(sample_metrics(fid_clf, real, x, test, train.num_classes, cfg.seed, labels=labels))
        results[key] = row
        image_grid(os.path.join(args.out, f"samples-{key}.png"), x[:100], nrow=10)
        save_json(dict(recipe=recipe, rows=results), path)
        save_text(markdown(results, info, cfg), os.path.join(args.out, "results.md"))
    save_text(markdown(results, info, cfg), os.path.join(args.out, "results.md"))
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
