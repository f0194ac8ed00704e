"""gendiff: diffusion models that estimate their own confidence.

One rule: maximise a Gaussian log-likelihood. The network predicts a mean μ and a
per-element standard deviation σ_φ of the clean data (THEORY §2–§4).
"""
from . import guidance, losses, samplers, scores
from .precond import Denoiser, Prediction, Scalings, edm_scalings

__all__ = ["Denoiser", "Prediction", "Scalings", "edm_scalings", "guidance", "losses", "samplers", "scores"]
__version__ = "0.1.0"
