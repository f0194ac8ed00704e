"""The experiment layer over the library: recipes, run configs, run folders, the toy and image runs, the
ablation suites and their reports. Imports run one way: cli → experiments → library.

    from gendiff.experiments import load_run
    cfg, model = load_run("runs/my-run")          # any run folder of `gendiff train`
    x = model(x_noisy, sigma)                       # the EMA denoiser D(x̃; σ); model.predict(...) adds σ_φ
"""
from .kinds import KINDS, kind_of, load_run, sample

__all__ = ["KINDS", "kind_of", "load_run", "sample"]
