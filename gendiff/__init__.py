"""gendiff: diffusion models that estimate their own confidence.

One rule: maximise a Gaussian log-likelihood. The network predicts a mean μ and a
per-element standard deviation σ_φ of the clean data (THEORY §2–§4).
"""
from . import guidance, heads, losses, samplers, schedules, scores
from .heads import DiagonalHead, ExcessHead, FullHead, NoHead, Prediction, Scalings, SigmaOnlyHead
from .precond import Denoiser, EDMPrecond, EpsPrecond, Precond, VPrecond, X0Precond, edm_scalings

__all__ = ["Denoiser", "Prediction", "Scalings", "Precond", "EDMPrecond", "EpsPrecond",
           "X0Precond", "VPrecond",
           "edm_scalings", "NoHead", "DiagonalHead", "FullHead", "ExcessHead", "SigmaOnlyHead", "guidance",
           "heads", "losses", "samplers", "schedules", "scores"]
__version__ = "0.1.0"
