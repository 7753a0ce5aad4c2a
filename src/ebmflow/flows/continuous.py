r"""Continuous normalizing flow: an ODE $\mathrm{d}x/\mathrm{d}t = v_\phi(t, x)$ solved with
torchdiffeq.

$x(0) = z \sim \mathcal{N}(0, I)$, $x(1) = T(z)$. With the instantaneous change of variables
(Chen et al. 2018), $\mathrm{d} \log q_t(x(t)) / \mathrm{d}t = -\operatorname{tr}(\partial v / \partial x\,(t, x(t)))$, hence

$$\log q(x) = \log \rho(z) - \int_0^1 \operatorname{tr}\big(\partial v / \partial x\big)(t, x(t))\, \mathrm{d}t,
\qquad x(1) = x,\ x(0) = z.$$

The trace is exact for small $D$ ($D$ autograd passes) or estimated by Hutchinson,
$\operatorname{tr}(A) = \mathbb{E}[\epsilon^\top A \epsilon]$ with $\mathbb{E}[\epsilon \epsilon^\top] = I$ (one $\epsilon$ per solve, Gaussian or
Rademacher). Training: maximum likelihood (``nll``, backprop through the solver or with the
adjoint method) or flow matching on the linear path $x_t = (1 - t) x_0 + t x_1$, target
velocity $x_1 - x_0$ (``flow_matching_loss``; Lipman et al. 2023, Liu et al. 2023).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from ..energy.networks import make_activation
from .base import Flow, renamed_keyword

__all__ = [
    "ContinuousFlow",
    "TimeMLP",
    "exact_divergence",
    "hutchinson_divergence",
]

_FIXED_STEP = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")


def _check_method(method: str) -> None:
    """ValueError unless torchdiffeq knows the solver ``method`` (asked through its public
    ``odeint`` on a one-step problem, so no private torchdiffeq name is needed)."""
    if not isinstance(method, str):
        raise ValueError(f"method must be a torchdiffeq solver name, got {method!r}")
    y0, t = torch.zeros(1, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    options = {"step_size": 1.0} if method in _FIXED_STEP else None
    try:
        odeint(lambda _t, y: torch.zeros_like(y), y0, t, method=method, options=options)
    except ValueError as err:
        if "method" in str(err).lower():
            raise ValueError(f"method must be a torchdiffeq solver, got {method!r} ({err})") from None
        raise


def exact_divergence(v: Tensor, x: Tensor, create_graph: bool = False) -> Tensor:
    r"""$\operatorname{tr}(\partial v / \partial x)$ per row by $D$ reverse-mode passes: ``v, x (B, D) -> (B,)``.

    ``v`` must have been computed from ``x`` with autograd enabled.
    """
    div = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for i in range(x.shape[1]):
        (g,) = torch.autograd.grad(v[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
        div = div + g[:, i]
    return div


def hutchinson_divergence(v: Tensor, x: Tensor, eps: Tensor, create_graph: bool = False) -> Tensor:
    r"""Unbiased estimate $\epsilon^\top (\partial v / \partial x)\, \epsilon$ of
    $\operatorname{tr}(\partial v / \partial x)$ with one vector-Jacobian product:
    ``v, x, eps (B, D) -> (B,)``; unbiased whenever $\mathbb{E}[\epsilon \epsilon^\top] = I$."""
    (g,) = torch.autograd.grad(v, x, grad_outputs=eps, create_graph=create_graph, retain_graph=True)
    return (g * eps).sum(-1)


class TimeMLP(nn.Module):
    """Velocity field v(t, x) = MLP([x, t]) -> (B, D), the default of ``ContinuousFlow``.

    ``t`` may be a float, a 0-d tensor or ``(B,)``. The last layer starts at zero (v = 0, the
    identity flow).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64), activation: str = "silu"):
        super().__init__()
        layers: list[nn.Module] = []
        width = dim + 1
        for h in hidden:
            layers += [nn.Linear(width, int(h)), make_activation(activation)]
            width = int(h)
        last = nn.Linear(width, dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        return self.net(torch.cat([x, t[:, None]], dim=-1))


class _Dynamics(nn.Module):
    r"""Augmented ODE $\frac{\mathrm{d}}{\mathrm{d}t} [x, a] = [v(t, x),
    \operatorname{tr}(\partial v / \partial x)(t, x)]$ for torchdiffeq."""

    def __init__(self, velocity: nn.Module):
        super().__init__()
        self.velocity = velocity
        self.exact = True
        self.eps: Tensor | None = None

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x = state[0]
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not (create_graph and x.requires_grad):
                x = x.detach().requires_grad_(True)
            v = self.velocity(t, x)
            if self.exact:
                div = exact_divergence(v, x, create_graph)
            else:
                assert self.eps is not None
                div = hutchinson_divergence(v, x, self.eps, create_graph)
        if not create_graph:
            v, div = v.detach(), div.detach()
        return v, div


class ContinuousFlow(Flow):
    r"""Continuous normalizing flow on ``Continuous(dim)`` with base $\mathcal{N}(0, I)$.

    forward: integrate $\mathrm{d}x/\mathrm{d}t = v(t, x)$ from $t = 0$ ($z$) to $t = 1$ ($x$),
    with $\log|\det \partial T / \partial z| = \int_0^1 \operatorname{tr}(\partial v / \partial x)\, \mathrm{d}t$;
    inverse: the same ODE from $t = 1$ back to $t = 0$.

    Args:
        dim: D.
        velocity: module ``v(t, x) -> (B, D)`` (default ``TimeMLP(dim, hidden)``).
        hidden: widths of the default velocity MLP (default (64, 64)).
        activation: its activation (default "silu").
        method: torchdiffeq solver (default "rk4", a fixed-step solver; "dopri5" is adaptive).
        ode_steps: number of ODE steps for fixed-step solvers (default 16). Formerly
            ``n_steps=`` (still accepted for one release, with a ``DeprecationWarning``: in
            ebmflow ``n_steps`` counts MCMC transitions).
        atol: absolute tolerance of adaptive solvers (default 1e-5).
        rtol: relative tolerance of adaptive solvers (default 1e-5).
        adjoint: use ``odeint_adjoint`` (memory O(1) in the number of steps) for maximum
            likelihood training (default False: backprop through the solver).
        trace: "exact" (D autograd passes per evaluation), "hutchinson" (one vector-Jacobian
            product with a noise vector drawn once per solve) or "auto" (default: exact when
            D <= 8).
        noise: Hutchinson noise, "rademacher" (default, lower variance) or "gaussian".

    With ``trace="hutchinson"``, ``log_prob`` is a noisy (unbiased in log q) estimate; pass
    ``generator=`` to make it deterministic. ``FlowMC`` needs an exact log q (an MH proposal
    density): use ``trace="exact"`` (D backward passes per ODE evaluation) and a solver
    accurate enough that forward and inverse solves agree (FlowMC checks it).
    """

    def __init__(
        self,
        dim: int,
        velocity: nn.Module | None = None,
        *,
        hidden: Sequence[int] = (64, 64),
        activation: str = "silu",
        method: str = "rk4",
        ode_steps: int | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        adjoint: bool = False,
        trace: str = "auto",
        noise: str = "rademacher",
        n_steps: int | None = None,
    ):
        super().__init__(dim)
        ode_steps = renamed_keyword("ContinuousFlow", "n_steps", n_steps, "ode_steps", ode_steps, 16)
        if trace not in ("auto", "exact", "hutchinson"):
            raise ValueError(f"trace must be 'auto', 'exact' or 'hutchinson', got {trace!r}")
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
        if not isinstance(ode_steps, int) or isinstance(ode_steps, bool) or ode_steps < 1:
            raise ValueError(f"ode_steps must be a positive int, got {ode_steps!r}")
        _check_method(method)
        self.velocity = velocity if velocity is not None else TimeMLP(dim, hidden, activation)
        self.dynamics = _Dynamics(self.velocity)
        self.method = method
        self.ode_steps = ode_steps
        self.atol = atol
        self.rtol = rtol
        self.adjoint = adjoint
        self.trace = trace
        self.noise = noise

    @property
    def n_steps(self) -> int:
        """Deprecated name of ``ode_steps``."""
        warnings.warn("ContinuousFlow.n_steps is deprecated; use ContinuousFlow.ode_steps",
                      DeprecationWarning, stacklevel=2)
        return self.ode_steps

    @property
    def exact_trace(self) -> bool:
        return self.trace == "exact" or (self.trace == "auto" and self.dim <= 8)

    numerical_inverse = True

    @property
    def exact_log_prob(self) -> bool:  # type: ignore[override]
        """True with an exact trace (Hutchinson log q is a stochastic estimate)."""
        return self.exact_trace

    def _integrate(
        self, x: Tensor, t0: float, t1: float, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        self.dynamics.exact = self.exact_trace
        if not self.exact_trace:
            if self.noise == "gaussian":
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            else:
                u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                eps = (u < 0.5).to(x.dtype) * 2 - 1
            self.dynamics.eps = eps
        t = torch.tensor([t0, t1], device=x.device, dtype=x.dtype)
        a0 = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        kwargs: dict = {"method": self.method}
        if self.method in _FIXED_STEP:
            kwargs["options"] = {"step_size": abs(t1 - t0) / self.ode_steps}
        else:
            kwargs.update(atol=self.atol, rtol=self.rtol)
        if self.adjoint and torch.is_grad_enabled():
            xs, as_ = odeint_adjoint(self.dynamics, (x, a0), t,
                                     adjoint_params=tuple(self.velocity.parameters()), **kwargs)
        else:
            xs, as_ = odeint(self.dynamics, (x, a0), t, **kwargs)
        self.dynamics.eps = None
        return xs[-1], as_[-1]

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        r"""$x = T(z)$ and $\log|\det \partial T / \partial z| = \int_0^1 \operatorname{tr}(\partial v / \partial x)\, \mathrm{d}t$."""
        return self._integrate(z, 0.0, 1.0, generator)

    def inverse(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        r"""$z = T^{-1}(x)$ and
        $\log|\det \partial T^{-1} / \partial x| = -\int_0^1 \operatorname{tr}(\partial v / \partial x)\, \mathrm{d}t$."""
        return self._integrate(x, 1.0, 0.0, generator)

    def log_prob(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""$\log q(x) = \log \rho(z) - \int_0^1 \operatorname{tr}(\partial v / \partial x)\, \mathrm{d}t$,
        ``(B, D) -> (B,)``."""
        self._check_input(x, "x")
        z, logdet = self.inverse(x, generator)
        return self.base_log_prob(z) + logdet

    def sample_and_log_prob(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""$n$ states $x = T(z)$, $z \sim \rho$, and $\log q(x) = \log \rho(z) - \log|\det
        \partial T / \partial z|$ (the ODE's trace integral): ``((n, D), (n,))``. The
        generator also drives the Hutchinson probes when ``trace="hutchinson"``."""
        z = self.base_sample(n, generator)
        x, logdet = self.forward(z, generator)
        return x, self.base_log_prob(z) - logdet

    def flow_matching_loss(self, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""Conditional flow matching on the linear path (a 0-d tensor):

        $$L = \operatorname{mean}_b \lVert v(t_b, x_t) - (x_{1,b} - x_{0,b}) \rVert^2, \qquad
        x_t = (1 - t) x_0 + t x_1,$$

        $x_0 \sim \mathcal{N}(0, I)$, $t \sim U(0, 1)$.

        Its minimiser is the marginal velocity whose flow maps $\mathcal{N}(0, I)$ to the law of $x_1$.
        """
        self._check_input(x1, "x1")
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        t = torch.rand(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        return (self.velocity(t, xt) - (x1 - x0)).pow(2).sum(-1).mean()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, method={self.method!r}, ode_steps={self.ode_steps}, "
                f"trace={'exact' if self.exact_trace else 'hutchinson'}, adjoint={self.adjoint}")
