"""Every recipe of the project as data over the library: the toy recipes of `gendiff ablate`
(the exact 2-D tree) and the image recipes of seed 004's table. A recipe says what to train
(head, parameterisation, loss, training density) and how to sample it; `build_model`, `density` and `loss_fn`
make the library objects from it and the run's train config. A new experiment adds entries here first.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..heads import make_head
from ..losses import WeightedLoss, make_loss
from ..nets.mlp import toy_denoiser
from ..nets.unet import UNet
from ..precond import PRECONDS, Denoiser
from ..process import DDPM
from ..schedules import (AdaptiveSchedule, DDPMSteps, LearnedDensity, LogNormalSigma, make_schedule,
                         make_weighting)

@dataclass(frozen=True)
class Spec:
    """A library object by name and keyword arguments, made by one of its make_* functions (k-diffusion's
    `make_sample_density`): `spec("cosine", shift=1.0)` → `make_schedule("cosine", shift=1.0)`. Frozen and
    hashable so that a recipe stays a value; `asdict` writes it into a results file."""
    name: str
    kw: tuple = ()               # (key, value) pairs

    @property
    def kwargs(self) -> dict:
        return dict(self.kw)


def spec(name: str, **kw) -> Spec:
    return Spec(name, tuple(kw.items()))


@dataclass(frozen=True)
class ToyRecipe:
    head: str                    # confidence head: a key of heads.HEADS (none | diag | full | excess | …)
    mode: str                    # training batches: point | source | point-cov (the exact mixture's modes)
    loss: str                    # key of losses.LOSSES
    score_mode: str = "tweedie"  # sampling score: T13, T14, or the hybrid
    model: str | None = None     # reuse the trained model of another recipe
    help: str = ""
    precond: str = "edm"         # key of precond.PRECONDS: the parameterisation (T21)
    schedule: Spec | None = None   # training density (schedules.make_schedule; adaptive, learned); None: the
                                   # train config's ln σ ~ N(p_mean, p_std²)
    weighting: Spec | None = None  # for loss "weighted": w(λ) (schedules.make_weighting)

    def density(self, train):
        """The training density: the recipe's schedule, or the train config's ln σ ~ N(p_mean, p_std²)."""
        s = self.schedule
        if s is None:
            return LogNormalSigma(train.p_mean, train.p_std)
        if s.name == "adaptive":  # T20: p(λ) fitted to w(λ)·E[‖ε̂ − ε‖² | λ] during training
            return AdaptiveSchedule(make_weighting(self.weighting.name, **self.weighting.kwargs), **s.kwargs)
        if s.name == "learned":   # T22: γ_η's shape trained jointly to minimise the loss' variance
            return LearnedDensity(**s.kwargs)
        return make_schedule(s.name, **s.kwargs)

    def build_model(self, train, width: int | None = None, dim: int = 2):
        """The toy MLP denoiser of this recipe (head, precond) at the train config's size."""
        return toy_denoiser(self.head, dim=dim, width=width or train.width, hidden_layers=train.hidden_layers,
                            precond=PRECONDS[self.precond](train.sigma_data))

    def loss_fn(self, density):
        if self.loss == "weighted":
            if self.weighting is None:
                raise ValueError("loss='weighted' needs a weighting (T19)")
            return WeightedLoss(make_weighting(self.weighting.name, **self.weighting.kwargs), density)
        return make_loss(self.loss, density)


def _objective(precond, schedule, weighting=None, loss="weighted", head="none", help=""):
    return ToyRecipe(head, "point", loss, precond=precond, schedule=schedule, weighting=weighting, help=help)


_ENDS = (0.002, 80.0)   # VDM++-style equal endpoints for every density of the suite (truncate=)
_COS, _LOGU = spec("cosine", truncate=_ENDS), spec("log-uniform", sigma_min=0.002, sigma_max=80.0)
_SIG = spec("sigmoid", bias=2.0)
OBJECTIVE_GRID = {
    # every parameterisation under its classic weighting (VDM++ Table 1)
    "obj-F-edm": ToyRecipe("none", "point", "edm", model="edm",
                           help="F-prediction, EDM weighting and density: "
                         "the edm run's model (not retrained)"),
    "obj-eps-simple": _objective("eps", _COS, spec("eps-cosine"),
                                 help="ε-prediction, L_simple under the cosine "
                                 "schedule: w = sech(λ/2) ∝ p(λ)"),
    "obj-v-cosine": _objective("v", _COS, spec("v"),
                               help="v-prediction under the cosine schedule: w = e^(−λ/2)"),
    "obj-x0-sigmoid": _objective("x0", _COS, _SIG, help="x0-prediction, sigmoid(−λ + 2) weighting"),
    # every weighting under one parameterisation (F, EDM preconditioning) and one density (cosine)
    "w-elbo": _objective("edm", _COS, spec("elbo"), help="w ≡ 1 (ELBO)"),
    "w-sigmoid": _objective("edm", _COS, _SIG, help="w = sigmoid(−λ + 2), VDM++'s best"),
    "w-edm": _objective("edm", _COS, spec("edm"),
                        help="EDM's weighting under a cosine density (importance-weighted)"),
    "w-edm-monotonic": _objective("edm", _COS, spec("edm-monotonic"),
                                  help="EDM-monotonic: EDM's weighting held "
                                  "at its peak for every λ below it (VDM++)"),
    "w-v": _objective("edm", _COS, spec("v"), help="w = e^(−λ/2)"),
    "w-eps-cosine": _objective("edm", _COS, spec("eps-cosine"), help="w = sech(λ/2)"),
    "w-min-snr": _objective("edm", _COS, spec("min-snr", gamma=5.0), help="min-SNR-5"),
    # every training density under one weighting (sigmoid) and parameterisation (F): T17 says same objective
    "p-cosine-shift+1": _objective("edm", spec("cosine", shift=1.0, truncate=_ENDS), _SIG,
                                   help="shifted cosine, s = 1"),
    "p-cosine-shift-1": _objective("edm", spec("cosine", shift=-1.0, truncate=_ENDS), _SIG,
                                   help="shifted cosine, s = −1"),
    "p-edm-training": _objective("edm", spec("edm-training", p_mean=-1.2, p_std=1.2, truncate=_ENDS), _SIG,
                                 help="EDM training density λ ~ N(2.4, 2.4²)"),
    "p-flow-matching": _objective("edm", spec("flow-matching", truncate=_ENDS), _SIG,
                                  help="flow-matching density sech²(λ/4)/8"),
    "p-log-uniform": _objective("edm", _LOGU, _SIG, help="log-uniform σ in [0.002, 80] (VE and VP at these "
                                "endpoints: both are uniform in λ)"),
    "p-adaptive": _objective("edm", spec("adaptive", sigma_min=0.002, sigma_max=80.0), _SIG,
                             help="adaptive p(λ) ∝ w·E[‖ε̂ − ε‖² | λ], fitted during training (T20)"),
    "p-learned": _objective("edm", spec("learned", sigma_min=0.002, sigma_max=80.0), _SIG,
                            help="VDM's learned γ_η(t) as the density, its shape trained jointly to minimise "
                                 "the "
                            "loss' variance (T22)"),
    # VE, VP and flow matching at equal endpoints σ ∈ [0.002, 80] and equal weighting (VDM++ §2): in VE space
    # a
    # process is the λ density its uniform t induces (VE geometric σ and VP linear λ: both uniform in λ) plus
    # its customary parameterisation
    "proc-ve": replace(_objective("edm", _LOGU, _SIG), model="p-log-uniform",
                       help="VE: geometric σ (uniform λ), F-prediction, sigmoid weighting (= p-log-uniform)"),
    "proc-vp": _objective("eps", _LOGU, _SIG,
                          help="VP: linear λ (uniform λ), ε-prediction, sigmoid weighting"),
    "proc-flow": replace(_objective("edm", spec("flow-matching", truncate=_ENDS), _SIG),
                         model="p-flow-matching",
                         help="flow matching: its λ density sech²(λ/4)/8, F-prediction, sigmoid weighting "
                         "(= p-flow-matching)"),
    # the confidence-aware NLL under three densities
    "nll-cosine": _objective("edm", _COS, loss="nll", head="diag",
                             help="confidence NLL (T9), cosine density"),
    "nll-log-uniform": _objective("edm", _LOGU, loss="nll", head="diag",
                                  help="confidence NLL, log-uniform σ"),
}


TOY_RECIPES = {
    "edm": ToyRecipe("none", "point", "edm", help="EDM baseline with EDM's weighting: ½‖F − F*‖² at every σ, "
                   "the seed's own baseline (ToyModel.loss, new=False)"),
    "confidence-frozen": ToyRecipe("none", "point", "nll", help="the confidence NLL with σ_φ frozen at c_var "
                                 "(G ≡ 0): EDM's optimum per σ, weighted k(σ)/2 across σ (T11)"),
    "confidence": ToyRecipe("diag", "point", "nll", help="diagonal σ_φ, point mode, Tweedie score (T9, T13)"),
    "confidence-full": ToyRecipe("full", "source", "nll", help="full covariance, consistent source mode: "
                               "x0 = component mean, known Σ_src (T3, T12)"),
    "confidence-full-phi-score": ToyRecipe("full", "source", "nll", "phi", model="confidence-full",
                                         help="confidence-full sampled with the σ_φ score (T14), no "
                                              "retraining"),
    "confidence-full-hybrid": ToyRecipe("full", "source", "nll", "hybrid", model="confidence-full",
                                      help="confidence-full sampled with T14 below --hybrid-sigma, T13 "
                                           "above"),
    "seed-method": ToyRecipe("full", "point-cov", "nll",
                             help="the seed's new_method as its training.py runs it: "
                           "full head, x0 = the clean sample, plus tr(SSᵀΣ_src)/c_var² with the sample's Σ_k "
                           "(Σ_src counted twice); Sᵀ(F − F*) contracted as intended"),
    "score-matching": ToyRecipe("none", "point", "score-matching",
                                help="exact score matching, weight σ² (§10)"),
    # Beyond the default suite:
    "confidence-phi-score": ToyRecipe("diag", "point", "nll", "phi", model="confidence",
                                    help="confidence sampled with the σ_φ score (T14)"),
    "confidence-full-point": ToyRecipe("full", "point", "nll",
                                       help="full covariance trained in point mode (T12, "
                                     "Σ_src = 0)"),
    "confidence-excess": ToyRecipe("excess", "point", "nll",
                                   help="excess-variance head σ_φ² = σ² + c_out²·e^G (T37), point mode, "
                                        "Tweedie score"),
    "confidence-sigma-only": ToyRecipe("sigma-only", "point", "nll",
                                       help="EDM2's learned u(σ) as the head: σ_φ² = c_var²·e^(u(σ)), one "
                                            "value per noise level (T9)"),
}
TOY_RECIPES.update(OBJECTIVE_GRID)
# w-v is left out of the objectives suite (still a recipe): in VE space v = −F (T21, precond.VPrecond), so it
# trains the same model as obj-v-cosine (bit-identical metrics, docs/results/objectives-seed0.md); this keeps
# the suite within 20 minutes on a 2-core CPU.
MAIN_RUNS = ("edm", "confidence-frozen", "confidence", "confidence-full", "confidence-full-phi-score",
             "confidence-full-hybrid", "seed-method", "score-matching")
SUITES = {"main": MAIN_RUNS, "objectives": ("edm", "confidence", *(r for r in OBJECTIVE_GRID if r != "w-v"))}


# ---- images ------------------------------------------------------------------------------------------

DDPM_T = 1000                      # seed 004 / DDPM: T = 1000 linear β steps
RESPACED = 100                     # default sampling steps of the DDPM recipes (IDDPM respacing)
HEUN_STEPS = 18                    # EDM's CIFAR-10 setting: NFE 35


def ddpm() -> DDPM:
    return DDPM(T=DDPM_T)


@dataclass(frozen=True)
class ImageRecipe:
    precond: str                # precond.PRECONDS key: the parameterisation (T21)
    loss: str                   # a key of losses.LOSSES: simple-x0 | simple-eps | hybrid | edm | nll
    head: str = "none"          # none | diag, excess (σ_φ per pixel) | sigma-only (EDM2's u(σ)) | v (IDDPM)
    density_name: str = "ddpm"  # ddpm: t uniform in 1..T (schedules.DDPMSteps); edm: ln σ ~ N(p_mean, p_std²)
    rule: str = "eps"           # DDPM update of seed 004 (samplers.sample_ddpm), for the ddpm density
    conditional: bool = False   # class embedding + label dropout (CFG, T33)
    label_dropout: float = 0.0
    help: str = ""

    @property
    def sampler(self) -> str:
        return "ddpm" if self.density_name == "ddpm" else "heun"

    def density(self, train):
        return DDPMSteps(ddpm()) if self.density_name == "ddpm" else LogNormalSigma(train.p_mean, train.p_std)

    def loss_fn(self, density):
        return make_loss(self.loss, density)

    def build_model(self, cfg, shape: tuple, num_classes: int, backbone=None) -> Denoiser:
        """Denoiser(UNet) for images of `shape` (C, H, W): G channels as the head declares (`outputs`); class
        embedding for conditional recipes. DDPM recipes use σ_data = 1, so that c_in·x̃ = z, the DDPM latent,
        is the net's input; the EDM recipes cfg.train.sigma_data (a number by now: images.prepare measures
        it where the config says 0). backbone: None (the UNet of cfg.model) or a callable (shape,
        num_classes, g_channels) -> nn.Module honouring the Denoiser contract, to train another network
        through the same recipe."""
        m = cfg.model
        classes, g = (num_classes if self.conditional else 0), make_head(self.head).outputs(shape[0])
        if backbone is not None:
            net = backbone(shape, classes, g)
        else:
            net = UNet(img_resolution=shape[1], img_channels=shape[0], model_channels=m.model_channels,
                       channel_mult=m.channel_mult, num_blocks=m.num_blocks,
                       attn_resolutions=m.attn_resolutions,
                       dropout=m.dropout, num_classes=classes, g_channels=g,
                       emb_channels=m.emb_channels or None, resample=m.resample)
        sigma_data = 1.0 if self.density_name == "ddpm" else cfg.train.sigma_data
        return Denoiser(net, PRECONDS[self.precond](sigma_data), self.head)


IMAGE_RECIPES = {
    "x0": ImageRecipe("x0", "simple-x0", rule="x0", help="x0-prediction, ‖x̂0 − x0‖² (seed 004)"),
    "eps": ImageRecipe("eps", "simple-eps", rule="eps", help="ε-prediction, L_simple = ‖ε̂ − ε‖² (DDPM)"),
    "score": ImageRecipe("score-vp", "simple-eps", rule="score", help="score prediction, (1 − ᾱ)‖s − s_θ‖²"),
    "score-cfg": ImageRecipe("score-vp", "simple-eps", rule="score", conditional=True, label_dropout=0.1,
                             help="class-conditional score prediction, labels dropped to ∅ w.p. 0.1; sampled "
                                  "with classifier-free guidance at each of cfg_weights (T33)"),
    "learned-variance": ImageRecipe("eps", "hybrid", head="v", rule="eps",
                                    help="ε-prediction + IDDPM v head, hybrid loss λ = 0.001 (T26)"),
    "edm": ImageRecipe("edm", "edm", density_name="edm", help="EDM: F-prediction, EDM weighting and density"),
    "confidence": ImageRecipe("edm", "nll", head="diag", density_name="edm",
                              help="confidence-aware: EDM precond + c_var, σ_φ per pixel, Gaussian NLL (T9)"),
    "confidence-excess": ImageRecipe("edm", "nll", head="excess", density_name="edm",
                                     help="as confidence with the excess-variance head "
                                          "σ_φ² = σ² + c_out²·e^G per pixel (T37)"),
    "confidence-excess-cfg": ImageRecipe("edm", "nll", head="excess", density_name="edm", conditional=True,
                                         label_dropout=0.1,
                                         help="class-conditional confidence-excess, labels dropped to ∅ "
                                              "w.p. 0.1: classifier-free guidance (T33) or autoguidance "
                                              "(T34) by a conditional guide"),
    "confidence-excess-loggrad": ImageRecipe("edm", "nll-log-grad", head="excess", density_name="edm",
                                             help="as confidence-excess (T37's loss value and T8's optimum), "
                                                  "G's gradient taken in log σ_φ² as T6's: it does not "
                                                  "vanish where Var[x0 | x̃] ≪ σ²"),
    "confidence-posterior": ImageRecipe("edm", "nll-posterior", head="excess", density_name="edm",
                                        help="as confidence-excess, with the NLL of x0 under the head's own "
                                             "N(μ, σ_φ² − σ²) added for G (μ held): G's gradient no longer "
                                             "vanishes where Var[x0 | x̃] ≪ σ²; EXPERIMENTAL: "
                                             "fine-tuning MNIST with it ruined the samples (FID 27 -> "
                                             "647, BENCHMARKS)"),
    "confidence-sigma-only": ImageRecipe("edm", "nll", head="sigma-only", density_name="edm",
                                         help="as confidence with EDM2's u(σ): one σ_φ per noise level, "
                                              "σ_φ² = c_var²·e^(u(σ)) (T9)"),
}
TABLE_ROWS = ("x0", "eps", "score", "score-cfg", "learned-variance", "edm", "confidence")
# the confidence heads on real images (issue 18): T6's head, T37's, EDM2's u(σ) as a head, T37 with G's
# gradient in log σ_φ²
CONFIDENCE_ROWS = ("confidence", "confidence-excess", "confidence-sigma-only", "confidence-excess-loggrad")
# image suites of `gendiff ablate`: their rows and default preset (experiments/config.py PRESETS)
IMAGE_SUITES = {"images": (TABLE_ROWS, "mnist-cpu"), "confidence-images": (CONFIDENCE_ROWS, "mnist-conf")}
