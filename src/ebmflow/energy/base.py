r"""The ``EnergyModel`` base class: subclass it and implement ``energy``.

An energy model defines an unnormalised density $p(x) \propto \exp(-E(x))$ on a ``Space``.
Lower energy means more probable; ``log_prob`` of an unnormalised model means $-E(x)$.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from ..spaces import Categorical, Space, check_same_device

__all__ = ["EnergyModel", "SumEnergy"]


class EnergyModel(nn.Module):
    r"""Base class of energy models $E(x)$, density $p(x) \propto \exp(-E(x))$.

    Subclasses set ``self.space`` and implement ``energy(x) -> (B,)``. Everything else
    (``forward``, ``score``, ``energy_and_grad``, sampling, losses, metrics) comes from here:

        class Quadratic(EnergyModel):
            def __init__(self):
                super().__init__(Continuous(2))
                self.scale = nn.Parameter(torch.ones(()))

            def energy(self, x):
                return 0.5 * self.scale * x.pow(2).sum(-1)

    Inputs: a batch of states of ``space`` (see ``ebmflow.spaces``). For a ``Categorical``
    space the energy must also accept the one-hot float relaxation ``(B, D, K)``: use
    ``self.space.one_hot(x)`` at the top of ``energy`` (it is the identity on one-hot input);
    gradient-based discrete samplers differentiate through it.

    ``forward(x)`` returns ``energy(x)`` after checking the output's shape ``(B,)``; when the
    energy fails it names a device or dtype mismatch between ``x`` and the model. It never
    reads tensor values, so it adds no host synchronisation.
    """

    space: Space

    def __init__(self, space: Space):
        super().__init__()
        if not isinstance(space, Space):
            raise ValueError(
                f"space must be an ebmflow.spaces.Space (Continuous, Binary, Categorical), "
                f"got {type(space).__name__}"
            )
        self.space = space

    # -- to implement ------------------------------------------------------------------
    def energy(self, x: Tensor) -> Tensor:
        """$E(x)$ for a batch of states ``x``; returns float ``(B,)``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement energy(self, x) -> Tensor of shape (B,)"
        )

    # -- provided ----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Same as ``energy(x)``, with device and output-shape checks."""
        try:
            out = self.energy(x)
        except (RuntimeError, IndexError) as err:
            # Diagnose only on failure: the hot path pays nothing for these checks.
            self._diagnose_input(x, err)
            raise
        if not isinstance(out, Tensor) or out.dim() != 1 or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{type(self).__name__}.energy returned {got} for a batch of {x.shape[0]} "
                f"states; it must return shape (B,) = ({x.shape[0]},) (e.g. .squeeze(-1) or "
                f".sum over event dims)"
            )
        return out

    def _diagnose_input(self, x: Tensor, err: Exception) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}") from err
        space = self.space
        event = tuple(x.shape[1:])
        one_hot = isinstance(space, Categorical) and event == (space.num_dims, space.num_classes)
        if x.dim() < 1 or (event != tuple(space.shape) and not one_hot):
            raise ValueError(
                f"x has shape {tuple(x.shape)} but {type(self).__name__}'s space {space!r} "
                f"expects (B, {', '.join(str(s) for s in space.shape)}); batch dimension first"
            ) from err
        if isinstance(space, Categorical) and not one_hot and not x.is_floating_point():
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= space.num_classes):
                raise ValueError(
                    f"x has values in [{int(x.min())}, {int(x.max())}] but {space!r} needs "
                    f"integers in [0, {space.num_classes - 1}]"
                ) from err
        elif not isinstance(space, Categorical) and not x.is_floating_point():
            raise ValueError(
                f"x has dtype {x.dtype} but {space!r} states are floating point; pass x.float()"
            ) from err
        ref = self._reference_tensor()
        if ref is None:
            return
        check_same_device(x, ref.device)
        if x.is_floating_point() and ref.is_floating_point() and x.dtype != ref.dtype:
            raise ValueError(
                f"x has dtype {x.dtype} but {type(self).__name__} has {ref.dtype} parameters; "
                f"cast one of them, e.g. x.to({ref.dtype}) or model.to({x.dtype})"
            ) from err

    def log_prob(self, x: Tensor) -> Tensor:
        """Unnormalised log-density $-E(x)$, ``(B,)``. Analytic targets override it exactly."""
        return -self(x)

    @property
    def has_local_conditionals(self) -> bool:
        """True when ``conditional_energies`` is overridden by a local formula (cheaper than
        evaluating the energy on the changed states); ``Gibbs`` picks its path by it."""
        return type(self).conditional_energies is not EnergyModel.conditional_energies

    def conditional_energies(
        self, x: Tensor, index: Tensor, energy_x: Tensor | None = None
    ) -> Tensor:
        r"""Energies of every value of one coordinate per chain, ``(B, K)``:

        $$
        \text{out}[b, k] = E(x_b \text{ with coordinate } \text{index}[b] \text{ set to } k),
        \qquad k = 0, \dots, K - 1,
        $$

        for discrete states ``x`` ``(B, D)`` (``Binary``: $K = 2$, float $\{0, 1\}$;
        ``Categorical``: long values) and ``index`` long ``(B,)``. ``energy_x`` $= E(x)$
        ``(B,)``, when given, is used for each chain's current value, so this default costs one
        energy call on the ``B * (K - 1)`` states that differ from $x$. ``Gibbs`` reads its
        conditionals $p(x_i = k \mid x_{-i}) \propto \exp(-\text{out}[:, k])$ from here: override
        it when the energy has a cheaper local formula (``IsingEnergy`` does, $O(D)$ per chain
        instead of $O(D^2)$).
        """
        k = getattr(self.space, "num_classes", None)
        if k is None or x.dim() != 2:
            raise ValueError(
                f"conditional_energies needs discrete states (B, D) of a Binary or Categorical "
                f"space; {type(self).__name__} has {self.space!r} and x has shape "
                f"{tuple(x.shape)}"
            )
        b = x.shape[0]
        current = x.gather(1, index[:, None]).long()  # (B, 1)
        values = (current + torch.arange(1, k, device=x.device)) % k  # (B, K-1), all others
        cand = repeat(x, "b d -> b j d", j=k - 1).clone()
        cand.scatter_(2, repeat(index, "b -> b j 1", j=k - 1), values[..., None].to(x.dtype))
        e_other = rearrange(self(rearrange(cand, "b j d -> (b j) d")), "(b j) -> b j", j=k - 1)
        e_x = self(x) if energy_x is None else energy_x
        out = e_other.new_empty(b, k)
        out.scatter_(1, values, e_other)
        out.scatter_(1, current, e_x.to(out.dtype)[:, None])
        return out

    def energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return $(E(x), \partial E / \partial x)$ with shapes ``(B,)`` and ``x.shape``, both
        detached.

        Differentiates with respect to ``x`` only: ``torch.autograd.grad`` is asked for the
        input's gradient, so no ``.grad`` of any parameter is written. Works under
        ``torch.no_grad()`` (the gradient is enabled locally). For categorical spaces pass the
        one-hot state ``(B, D, K)`` to get the gradient in the relaxed space.
        """
        if torch.compiler.is_compiling():
            return functional_energy_and_grad(self, x)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            e = self(xg)
            (g,) = torch.autograd.grad(e.sum(), xg)
        return e.detach(), g.detach()

    def score(self, x: Tensor) -> Tensor:
        r"""Score $-\partial E / \partial x$, same shape as ``x`` (continuous, binary or one-hot
        states)."""
        if isinstance(self.space, Categorical) and not self.space.is_one_hot(x):
            x = self.space.one_hot(x)
        return -self.energy_and_grad(x)[1]

    def __add__(self, other: EnergyModel) -> SumEnergy:
        r"""``E1 + E2`` is the product of experts $p \propto \exp(-E_1 - E_2)$, e.g. a learned
        energy plus a ``BernoulliBaseEnergy`` base measure."""
        if not isinstance(other, EnergyModel):
            return NotImplemented
        return SumEnergy(self, other)

    def _reference_tensor(self) -> Tensor | None:
        for p in self.parameters():
            return p
        for b in self.buffers():
            return b
        return None

    def reference_tensor(self) -> Tensor | None:
        """A parameter or buffer of the model (None if it has none): where its device and
        dtype are read from. Subclasses customise it by overriding ``_reference_tensor``."""
        return self._reference_tensor()


class SumEnergy(EnergyModel):
    r"""$E(x) = \sum_i E_i(x)$ over energies of the same space (a product of experts)."""

    def __init__(self, *energies: EnergyModel):
        if len(energies) < 1:
            raise ValueError("SumEnergy needs at least one energy")
        space = energies[0].space
        for e in energies[1:]:
            if e.space != space:
                raise ValueError(
                    f"cannot add energies of different spaces: {space!r} and {e.space!r}"
                )
        super().__init__(space)
        self.terms = nn.ModuleList(energies)

    def energy(self, x: Tensor) -> Tensor:
        out = self.terms[0](x)
        for term in self.terms[1:]:
            out = out + term(x)
        return out

    @property
    def has_local_conditionals(self) -> bool:
        """True when some term has a local formula for ``conditional_energies``."""
        return type(self).energy is SumEnergy.energy and any(
            t.has_local_conditionals for t in self.terms
        )

    def energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Sum of the terms' $(E_i(x), \partial E_i / \partial x)$, so each term's own fast path
        is used (autograd for a subclass that overrides ``energy``)."""
        if type(self).energy is not SumEnergy.energy:
            return super().energy_and_grad(x)
        e, g = self.terms[0].energy_and_grad(x)
        for term in self.terms[1:]:
            e_i, g_i = term.energy_and_grad(x)
            e, g = e + e_i, g + g_i
        return e, g

    def conditional_energies(
        self, x: Tensor, index: Tensor, energy_x: Tensor | None = None
    ) -> Tensor:
        """Sum of the terms' conditional energies when any term has a local formula (the
        cached total ``energy_x`` cannot be split between terms, so it is not reused then)."""
        if not self.has_local_conditionals:
            return super().conditional_energies(x, index, energy_x)
        out = self.terms[0].conditional_energies(x, index)
        for term in self.terms[1:]:
            out = out + term.conditional_energies(x, index)
        return out


def functional_energy_and_grad(energy: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""$(E(x), \partial E / \partial x)$ by ``torch.func.grad_and_value`` (what compiled
    sampler blocks use).

    A function transform instead of ``torch.autograd.grad``: ``torch.compile`` traces it into
    one forward-and-backward graph (with ``autograd.grad`` inside a compiled region the
    backward runs eagerly). Differentiates $\sum_b E(x_b)$ with respect to $x$ only; the
    parameters are constants here, so no ``.grad`` is written.
    """

    def total(xs: Tensor) -> tuple[Tensor, Tensor]:
        e = energy(xs)
        return e.sum(), e

    g, (_, e) = torch.func.grad_and_value(total, has_aux=True)(x.detach())
    return e.detach(), g.detach()
