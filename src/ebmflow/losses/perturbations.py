r"""Perturbation kernels $q(y \mid x)$ for energy discrepancy.

Energy discrepancy (``EnergyDiscrepancy``) needs a Markov kernel $q$ on the state space that
is symmetric, $q(y \mid x) = q(x \mid y)$, so that the contrastive negatives are drawn by
applying it twice: $y \sim q(\cdot \mid x)$ once per data point, then $M$ negatives
$x'_j \sim q(\cdot \mid y)$.

Subclass ``Perturbation`` and implement ``perturb`` (one draw per row) to add your own;
``negatives`` then comes for free:

    class UniformBox(Perturbation):
        space_kind = Continuous

        def __init__(self, half_width=0.5):
            super().__init__()
            self.half_width = half_width

        def perturb(self, x, generator=None):
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return x + self.half_width * (2 * u - 1)

Kernels provided:

* ``GaussianPerturbation(t)``: $y = x + \sqrt{t}\, \xi$, $\xi \sim \mathcal{N}(0, I)$
  (continuous; $t$ is a variance).
* ``BernoulliPerturbation(eps)``: $y = x \oplus b$, $b_i \sim \mathrm{Bernoulli}(\varepsilon)$
  (binary).
* ``GridPerturbation()``: move to a uniformly chosen neighbour in the Hamming graph (binary:
  flip one bit; categorical: give one coordinate one of its $K - 1$ other values).
* ``CategoricalPerturbation(num_classes, kind, t)``: each coordinate jumps by the heat kernel
  $e^{t L}$ of a graph on the $K$ states (``"uniform"`` = complete graph, ``"cyclic"`` = ring,
  ``"ordinal"`` = path).

Perturbations draw no gradient: every method runs under ``torch.no_grad``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from ..samplers import rng
from ..spaces import Binary, Categorical, Continuous, Space

__all__ = [
    "Perturbation",
    "GaussianPerturbation",
    "BernoulliPerturbation",
    "GridPerturbation",
    "CategoricalPerturbation",
    "graph_laplacian",
    "heat_kernel",
]


def _positive_float(value: float, name: str, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive float, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {value!r}; {fix}")
    return value


class Perturbation(nn.Module):
    """Base class of symmetric perturbation kernels q(y | x) for energy discrepancy.

    Attributes:
        space_kind: the ``Space`` class (or tuple of classes) the kernel acts on.

    Subclasses implement ``perturb(x, generator) -> y`` with ``y`` of the same shape and dtype
    as ``x`` (one independent draw per row). ``negatives(y, m)`` draws m independent
    perturbations of every row, shape ``(B, M, *event)``.
    """

    space_kind: type[Space] | tuple[type[Space], ...] = Space

    def perturb(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One draw y ~ q(. | x) per row: ``(B, *event) -> (B, *event)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement perturb(x, generator)")

    @torch.no_grad()
    def negatives(self, y: Tensor, m: int, generator: torch.Generator | None = None) -> Tensor:
        """M independent draws x'_j ~ q(. | y) per row: ``(B, *event) -> (B, M, *event)``."""
        ys = repeat(y, "b ... -> (b m) ...", m=m)
        return rearrange(self.perturb(ys, generator), "(b m) ... -> b m ...", m=m)

    def check_space(self, space: Space) -> None:
        """Raise ``ValueError`` unless the kernel acts on ``space`` (cheap: no tensor reads)."""
        if not isinstance(space, self.space_kind):
            kinds = self.space_kind if isinstance(self.space_kind, tuple) else (self.space_kind,)
            names = " or ".join(k.__name__ for k in kinds)
            raise ValueError(
                f"{type(self).__name__} acts on {names} states but the energy's space is "
                f"{space!r}; pick a perturbation for that space (GaussianPerturbation for "
                f"Continuous, BernoulliPerturbation / GridPerturbation for Binary, "
                f"GridPerturbation / CategoricalPerturbation for Categorical)"
            )


class GaussianPerturbation(Perturbation):
    r"""Gaussian kernel $q(y \mid x) = \mathcal{N}(y; x, t I)$: $y = x + \sqrt{t}\, \xi$,
    $\xi \sim \mathcal{N}(0, I)$.

    ``t`` is a VARIANCE (default 1.0, the paper's choice on 2-D toys). Applied twice, the
    negative $x' = x + \sqrt{t}\, (\xi + \xi')$ has $x' - x \sim \mathcal{N}(0, 2 t I)$.
    """

    space_kind = Continuous

    def __init__(self, t: float = 1.0):
        super().__init__()
        self.t = _positive_float(t, "t", "t is the noise variance, e.g. t=1.0")

    @torch.no_grad()
    def perturb(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + math.sqrt(self.t) * xi

    def extra_repr(self) -> str:
        return f"t={self.t}"


class BernoulliPerturbation(Perturbation):
    r"""Bernoulli kernel on $\{0, 1\}^D$: $y = x \oplus b$ with independent
    $b_i \sim \mathrm{Bernoulli}(\varepsilon)$.

    Applied twice, each bit of $x'$ differs from $x$ with probability $2 \varepsilon (1 - \varepsilon)$.
    Defaults: $\varepsilon = 0.1$ (the paper uses $M = 32$ negatives with it).
    """

    space_kind = Binary

    def __init__(self, eps: float = 0.1):
        super().__init__()
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(
                f"eps must be a flip probability strictly inside (0, 1), got {eps!r}; "
                f"e.g. eps=0.1"
            )
        self.eps = float(eps)

    @torch.no_grad()
    def perturb(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        flip = torch.rand(x.shape, generator=generator, device=x.device) < self.eps
        return torch.where(flip, 1 - x, x)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class GridPerturbation(Perturbation):
    """Nearest-neighbour move in the Hamming graph: q(y | x) uniform over the states that
    differ from x in exactly one coordinate.

    * Binary ``(B, D)`` (``num_classes=None``, the default): flip one uniformly chosen bit.
    * Categorical ``(B, D)`` (``num_classes=K``): choose a coordinate d uniformly, then give it
      one of its K - 1 other values uniformly (x_d + r mod K with r uniform in 1..K-1).

    Symmetric, so y ~ q(. | x) and x' ~ q(. | y) is valid for energy discrepancy; x' = x
    with probability 1 / (D (K - 1)).
    """

    space_kind = (Binary, Categorical)

    def __init__(self, num_classes: int | None = None):
        super().__init__()
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(
                f"num_classes must be None (binary states) or an int >= 2, got {num_classes!r}"
            )
        self.num_classes = num_classes

    @torch.no_grad()
    def perturb(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, d = x.shape
        idx = torch.randint(0, d, (b, 1), generator=generator, device=x.device)
        cur = x.gather(1, idx)
        if x.is_floating_point():
            new = 1 - cur
        else:
            if self.num_classes is None:
                raise ValueError(
                    "GridPerturbation got long (categorical) states but no num_classes; "
                    "construct it as GridPerturbation(num_classes=K)"
                )
            shift = torch.randint(1, self.num_classes, (b, 1), generator=generator,
                                  device=x.device)
            new = (cur + shift) % self.num_classes
        return x.scatter(1, idx, new)

    def check_space(self, space: Space) -> None:
        super().check_space(space)
        if isinstance(space, Categorical) and self.num_classes != space.num_classes:
            raise ValueError(
                f"GridPerturbation(num_classes={self.num_classes}) does not match the energy's "
                f"space {space!r}; construct it as GridPerturbation(num_classes="
                f"{space.num_classes})"
            )
        if isinstance(space, Binary) and self.num_classes not in (None, 2):
            raise ValueError(
                f"GridPerturbation(num_classes={self.num_classes}) does not match the energy's "
                f"space {space!r}; use GridPerturbation() for binary states"
            )

    def extra_repr(self) -> str:
        return "" if self.num_classes is None else f"num_classes={self.num_classes}"


def graph_laplacian(num_classes: int, kind: str) -> np.ndarray:
    r"""Graph Laplacian $L = A - \operatorname{diag}(A \mathbf{1})$ of a graph on the $K$ states,
    float64 ``(K, K)``.

    * ``"uniform"``: complete graph (every state is a neighbour of every other).
    * ``"cyclic"``: ring $0 - 1 - \dots - (K-1) - 0$.
    * ``"ordinal"``: path $0 - 1 - \dots - (K-1)$.

    $L$ is symmetric with rows summing to 0, so $e^{tL}$ is a symmetric stochastic matrix.
    """
    k = num_classes
    if kind == "uniform":
        adj = np.ones((k, k)) - np.eye(k)
    elif kind in ("cyclic", "ordinal"):
        adj = np.zeros((k, k))
        i = np.arange(k - 1)
        adj[i, i + 1] = adj[i + 1, i] = 1.0
        if kind == "cyclic" and k > 2:
            adj[0, k - 1] = adj[k - 1, 0] = 1.0
    else:
        raise ValueError(
            f"kind must be 'uniform', 'cyclic' or 'ordinal', got {kind!r}"
        )
    return adj - np.diag(adj.sum(1))


def heat_kernel(num_classes: int, kind: str, t: float) -> np.ndarray:
    r"""Heat kernel $H = e^{tL}$ of ``graph_laplacian(num_classes, kind)``, float64 ``(K, K)``.

    $H_{ab} = q(y_d = b \mid x_d = a)$: rows sum to 1 and $H = H^\top$.
    """
    h = scipy.linalg.expm(t * graph_laplacian(num_classes, kind))
    h = np.clip(h, 0.0, None)  # expm may return -1e-17 for tiny entries
    return h / h.sum(1, keepdims=True)


class CategoricalPerturbation(Perturbation):
    r"""Heat-kernel perturbation on $\{0, \dots, K-1\}^D$: every coordinate moves independently
    with $q(y_d = b \mid x_d = a) = (e^{tL})_{ab}$, $L$ the Laplacian of a graph on the $K$ states.

    Args:
        num_classes: $K$, the number of states per coordinate (must match the energy's space).
        kind: ``"uniform"`` (complete graph:
            $e^{tL} = e^{-Kt} I + (1 - e^{-Kt}) \mathbf{1}\mathbf{1}^\top / K$,
            every other value equally likely), ``"cyclic"`` (ring) or ``"ordinal"`` (path:
            nearby values are likelier, for ordered categories such as discretised numbers).
            Default ``"uniform"``.
        t: diffusion time ($t > 0$), default 1.0. Large $t$ approaches uniform resampling.

    The ``(K, K)`` transition matrix is computed once (scipy.linalg.expm) and kept as the
    buffer ``transition`` with its row-wise cumulative sums ``cdf`` (sampling is inverse-CDF,
    batched over rows and coordinates).
    """

    space_kind = Categorical

    def __init__(self, num_classes: int, kind: str = "uniform", t: float = 1.0):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if kind not in ("uniform", "cyclic", "ordinal"):
            raise ValueError(f"kind must be 'uniform', 'cyclic' or 'ordinal', got {kind!r}")
        self.t = _positive_float(t, "t", "t is the diffusion time of the heat kernel, e.g. t=1.0")
        self.num_classes = num_classes
        self.kind = kind
        h = torch.as_tensor(heat_kernel(num_classes, kind, self.t), dtype=torch.float64)
        self.register_buffer("transition", h.float())
        cdf = h.cumsum(-1)
        cdf[:, -1] = 1.0
        self.register_buffer("cdf", cdf.float())

    @torch.no_grad()
    def perturb(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return rng.categorical_sample(cdf=self.cdf[x], generator=generator)  # rows (B, D, K)

    def check_space(self, space: Space) -> None:
        super().check_space(space)
        if space.num_classes != self.num_classes:  # type: ignore[attr-defined]
            raise ValueError(
                f"CategoricalPerturbation was built for num_classes={self.num_classes} but the "
                f"energy's space is {space!r}; construct it with "
                f"num_classes={space.num_classes}"  # type: ignore[attr-defined]
            )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, kind={self.kind!r}, t={self.t}"
