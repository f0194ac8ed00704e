"""One table from a run config's type to the module that trains and measures that kind of run. Every kind
module (toy.py, images.py, vae.py, latent.py) has the same functions: prepare, train_run, summary, load_model,
sample_run, eval_run, eval_summary, likelihood_run, likelihood_summary (a command that does not apply to a
kind is one ValueError there). `prepare(cfg)` returns a Setup whose `cfg` is
the config resolved (an image run's measured σ_data), the one to save in the run folder. A new kind of run is
one module and one line here."""
from __future__ import annotations

from . import images, latent, toy, vae
from .config import ImageRunConfig, LatentRunConfig, ToyRunConfig, VAERunConfig
from .runfolder import read_config

KINDS = {ToyRunConfig: toy, ImageRunConfig: images, VAERunConfig: vae, LatentRunConfig: latent}


def kind_of(cfg):
    return KINDS[type(cfg)]


def load_run(out: str, weights: str = "model.safetensors"):
    """(config, model) of a finished run folder of any kind: its config.toml and the weights file (the final
    EMA `model.safetensors`, or a post-hoc EMA of `gendiff posthoc-ema`), in eval mode without gradients."""
    cfg = read_config(out, "run")
    return cfg, kind_of(cfg).load_model(cfg, out, weights)


def sample(out: str, samples: int, dest: str, **options) -> dict:
    """`gendiff sample RUN --samples N --out DEST` in Python: N samples of the run's model written to DEST."""
    cfg, model = load_run(out, options.pop("weights", "model.safetensors"))
    return kind_of(cfg).sample_run(out, cfg, model, samples=samples, dest=dest, **options)
