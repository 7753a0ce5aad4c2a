"""Named components for the command line and config files: data sets, losses, samplers.

Every builder imports its component lazily, so a missing optional part gives a clear
``ComponentError`` naming it instead of an ImportError at start-up.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from ..energy.base import EnergyModel
from ..losses.base import EBMLoss
from ..samplers.base import Sampler
from ..spaces import Binary, Continuous, Space

__all__ = [
    "RunConfig",
    "ComponentError",
    "LOSSES",
    "SAMPLERS",
    "ENCODINGS",
    "dataset_names",
    "check_config",
    "build_data",
    "build_energy",
    "build_loss",
    "build_sampler",
    "build_eval_sampler",
    "default_sampler",
]

LOSSES = {
    "ed": "energy discrepancy (no sampler needed)",
    "cd": "contrastive divergence, short-run chains from the data",
    "pcd": "persistent contrastive divergence (replay buffer)",
    "dsm": "denoising score matching (continuous data only)",
}
CONTINUOUS_SAMPLERS = ("langevin", "mala", "hmc", "flowmc")
DISCRETE_SAMPLERS = ("gibbs", "gwg", "dula", "dmala", "discrete-flow")
SAMPLERS = CONTINUOUS_SAMPLERS + DISCRETE_SAMPLERS
ENCODINGS = ("none", "gray")
LEARNED_SAMPLERS = ("flowmc", "discrete-flow")
GRAY_BITS = 16


class ComponentError(ValueError):
    """A name, a pair of components or a setting that cannot work; the message says why."""


@dataclass
class RunConfig:
    """Every setting of ``ebmflow train`` (a TOML file holds any subset of them)."""

    data: str = "8gaussians"
    encoding: str = "none"
    loss: str = "ed"
    sampler: str | None = None
    steps: int = 6000
    batch: int = 128
    lr: float = 1e-3
    hidden: list[int] = field(default_factory=lambda: [128, 128, 128])
    ema: float | None = 0.99
    grad_clip: float | None = None
    n_train: int = 50_000
    n_test: int = 4_000
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1  # CPU threads: tiny 2-D models run fastest single-threaded
    # energy discrepancy
    t: float = 1.0
    m: int | None = None
    eps: float = 0.1
    w: float = 1.0
    # contrastive divergence / sampler
    sampler_steps: int = 10
    step_size: float | None = None
    alpha: float = 0.1
    buffer_size: int = 10_000
    dsm_sigma: float = 0.1
    # evaluation and logging
    eval_samples: int = 2_000
    eval_steps: int = 300
    log_every: int = 100
    checkpoint_every: int | None = 1000
    amp: bool = False
    compile: bool = False
    fast: bool = False

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        known = set(cls.keys())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ComponentError(
                f"unknown setting(s) {unknown} in {source}; valid keys: {', '.join(sorted(known))}"
            )
        cfg = cls()
        for key, value in values.items():
            setattr(cfg, key.replace("-", "_"), value)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dataset_names() -> list[str]:
    data = _import("ebmflow.data", "data sets")
    return list(data.TOY_DATASETS)


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ComponentError(f"{what} are not available in this installation ({err})") from err


def _get(module: str, name: str) -> Any:
    mod = _import(module, module)
    try:
        return getattr(mod, name)
    except AttributeError:
        raise ComponentError(
            f"{module}.{name} is not available in this installation of ebmflow"
        ) from None


def space_of(cfg: RunConfig) -> Space:
    return Binary(2 * GRAY_BITS) if cfg.encoding == "gray" else Continuous(2)


def default_sampler(cfg: RunConfig) -> str:
    return "gibbs" if cfg.encoding == "gray" else "mala"


def check_config(cfg: RunConfig) -> RunConfig:
    """Check names and pairs; fill ``sampler`` with the space's default. Raises ComponentError."""
    names = dataset_names()
    if cfg.data not in names:
        raise ComponentError(f"unknown data set {cfg.data!r}; valid names: {', '.join(names)}")
    if cfg.encoding not in ENCODINGS:
        raise ComponentError(f"unknown encoding {cfg.encoding!r}; valid names: {', '.join(ENCODINGS)}")
    if cfg.loss not in LOSSES:
        raise ComponentError(f"unknown loss {cfg.loss!r}; valid names: {', '.join(LOSSES)}")
    if cfg.sampler is None:
        cfg.sampler = default_sampler(cfg)
    if cfg.sampler not in SAMPLERS:
        raise ComponentError(f"unknown sampler {cfg.sampler!r}; valid names: {', '.join(SAMPLERS)}")
    binary = cfg.encoding == "gray"
    if binary and cfg.sampler in CONTINUOUS_SAMPLERS:
        raise ComponentError(
            f"sampler {cfg.sampler!r} moves continuous states but --encoding gray makes the data "
            f"binary; use one of {', '.join(DISCRETE_SAMPLERS)}"
        )
    if not binary and cfg.sampler in DISCRETE_SAMPLERS:
        raise ComponentError(
            f"sampler {cfg.sampler!r} moves binary states but {cfg.data!r} is continuous 2-D data; "
            f"use one of {', '.join(CONTINUOUS_SAMPLERS)} (or --encoding gray for binary data)"
        )
    if binary and cfg.loss == "dsm":
        raise ComponentError("score matching needs gradients in x, so continuous data; "
                             "drop --encoding gray or use --loss ed")
    for key in ("steps", "batch", "n_train", "n_test", "eval_samples", "log_every"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "steps" else 1):
            raise ComponentError(f"{key} must be a positive integer, got {value!r}")
    if cfg.batch > cfg.n_train:
        raise ComponentError(f"batch ({cfg.batch}) is larger than n_train ({cfg.n_train})")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ComponentError(f"device {cfg.device!r} requested but no CUDA GPU is available; use --device cpu")
    return cfg


def build_data(cfg: RunConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and held-out data in the energy's space, plus both as 2-D points (for plots)."""
    toy_2d = _get("ebmflow.data", "toy_2d")
    gen = torch.Generator().manual_seed(cfg.seed)
    train2d = toy_2d(cfg.data, cfg.n_train, generator=gen)
    test2d = toy_2d(cfg.data, cfg.n_test, generator=torch.Generator().manual_seed(cfg.seed + 10_007))
    if cfg.encoding == "gray":
        gray_encode = _get("ebmflow.data", "gray_encode")
        return gray_encode(train2d, GRAY_BITS), gray_encode(test2d, GRAY_BITS), train2d, test2d
    return train2d, test2d, train2d, test2d


def build_energy(cfg: RunConfig) -> EnergyModel:
    mlp = _get("ebmflow.energy", "MLPEnergy")
    return mlp(space_of(cfg), hidden=tuple(int(h) for h in cfg.hidden))


def build_loss(cfg: RunConfig) -> EBMLoss:
    if cfg.loss == "ed":
        ed = _get("ebmflow.losses", "EnergyDiscrepancy")
        if cfg.encoding == "gray":
            pert = _get("ebmflow.losses", "BernoulliPerturbation")(eps=cfg.eps)
            return ed(pert, m=cfg.m or 32, w=cfg.w)
        pert = _get("ebmflow.losses", "GaussianPerturbation")(t=cfg.t)
        return ed(pert, m=cfg.m or 4, w=cfg.w)
    if cfg.loss in ("cd", "pcd"):
        cd = _get("ebmflow.losses", "ContrastiveDivergence")
        return cd(alpha=cfg.alpha, init="data" if cfg.loss == "cd" else "default")
    return _get("ebmflow.losses", "DenoisingScoreMatching")(sigma=cfg.dsm_sigma)


def _mcmc(name: str, n_steps: int, step_size: float | None, warmup: int = 0) -> Sampler:
    s = "ebmflow.samplers"
    if name == "langevin":
        return _get(s, "Langevin")(step_size=step_size or 0.01, n_steps=n_steps)
    if name == "mala":
        return _get(s, "MALA")(step_size=step_size or 0.05, n_steps=n_steps, n_warmup=warmup)
    if name == "hmc":
        return _get(s, "HMC")(step_size=step_size or 0.1, n_leapfrog=5, n_steps=n_steps, n_warmup=warmup)
    if name == "gibbs":
        return _get(s, "Gibbs")(n_steps=n_steps)
    if name == "gwg":
        return _get(s, "GibbsWithGradients")(n_steps=n_steps)
    if name in ("dula", "dmala"):
        kw = {"step_size": step_size} if step_size else {}
        return _get(s, "DiscreteLangevin")(n_steps=n_steps, metropolis=name == "dmala", **kw)
    raise ComponentError(f"{name!r} is not an MCMC sampler")


def _learned(cfg: RunConfig, n_chains: int) -> Sampler:
    if cfg.sampler == "flowmc":
        flow = _get("ebmflow.flows", "RealNVP")(2, n_layers=6, hidden=(64, 64))
        local = _mcmc("mala", cfg.sampler_steps, cfg.step_size, warmup=100)
        return _get("ebmflow.flows", "FlowMC")(flow, local, n_local=cfg.sampler_steps, n_global=5,
                                               n_chains=n_chains)
    model = _get("ebmflow.discrete_flows", "MLPVelocity")(space_of(cfg).dim, 2, hidden=(256, 256))
    # fit_to="energy": the flow learns the current model p ∝ exp(-E) (data-free, importance
    # weighted), so its samples are negatives of the model, not copies of the data
    return _get("ebmflow.discrete_flows", "DiscreteFlowSampler")(model, batch_size=cfg.batch,
                                                                   fit_to="energy")


def build_sampler(cfg: RunConfig) -> Sampler | None:
    """The training sampler: negatives for cd/pcd, a learned sampler that adapts during training
    (flowmc, discrete-flow), or None (ed/dsm with an MCMC evaluation sampler)."""
    if cfg.sampler in LEARNED_SAMPLERS:
        sampler = _learned(cfg, n_chains=cfg.batch)
    elif cfg.loss in ("cd", "pcd"):
        sampler = _mcmc(cfg.sampler, cfg.sampler_steps, cfg.step_size)  # type: ignore[arg-type]
    else:
        return None
    if cfg.loss == "pcd":
        s = "ebmflow.samplers"
        if cfg.sampler in LEARNED_SAMPLERS:
            return sampler
        buffer = _get(s, "ReplayBuffer")(space_of(cfg), capacity=cfg.buffer_size)
        return _get(s, "PersistentSampler")(sampler, buffer, n_steps=cfg.sampler_steps)
    return sampler


def build_eval_sampler(cfg: RunConfig, trained: Sampler | None) -> Sampler:
    """The sampler for evaluation samples: a learned sampler as trained, otherwise a fresh
    MCMC kernel of the chosen kind run for ``eval_steps`` (MALA/HMC adapt during the first half)."""
    if cfg.sampler in LEARNED_SAMPLERS and trained is not None:
        return trained
    return _mcmc(cfg.sampler, cfg.eval_steps, cfg.step_size, warmup=cfg.eval_steps // 2)  # type: ignore[arg-type]


def eval_init(cfg: RunConfig, train2d: Tensor, n: int, generator: torch.Generator) -> Tensor | None:
    """Starting states of evaluation chains: a Gaussian with the data's mean and scale
    (continuous), None (the space's noise) otherwise."""
    if cfg.encoding == "gray":
        return None
    mean, std = train2d.mean(0), train2d.std(0)
    return mean + std * torch.randn(n, 2, generator=generator)
