"""Exponential moving average of a model's parameters and buffers."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["EMA"]


class EMA(nn.Module):
    r"""Exponential moving average (EMA) of a module's weights.

    After every optimiser step, ``update(model)`` sets, for every floating parameter and
    buffer,

    $$
    \text{avg} \leftarrow \text{decay} \cdot \text{avg} + (1 - \text{decay}) \cdot \text{current};
    $$

    integer buffers are copied. With ``warmup=True`` the decay used at update number $t$
    (1-based) is $\min\big(\text{decay}, \frac{1 + t}{10 + t}\big)$ so early averages are not
    dominated by the random initialisation.

    The averaged copy is ``ema.module`` (same class as the model, no gradients); evaluate and
    sample with it, e.g. ``sampler.sample(ema.module, n)``. The update runs with fused
    ``torch._foreach`` kernels and reads no tensor values (no host synchronisation), so it can
    be captured in a CUDA graph.

    Args:
        model: the module to average (typically the energy).
        decay: averaging weight of the past, in $[0, 1)$ (default 0.999).
        warmup: use the warm-up decay schedule above (default False).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"EMA needs an nn.Module, got {type(model).__name__}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}; e.g. decay=0.999")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()
        self._cache: tuple[Any, ...] | None = None

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        avg_f, cur_f, other = [], [], []
        mine = dict(self.module.named_parameters())
        mine.update(dict(self.module.named_buffers()))
        theirs = dict(model.named_parameters())
        theirs.update(dict(model.named_buffers()))
        if mine.keys() != theirs.keys():
            raise ValueError(
                "EMA.update got a model whose parameters differ from the averaged one "
                f"(missing {sorted(set(mine) - set(theirs))[:3]}, extra "
                f"{sorted(set(theirs) - set(mine))[:3]}); pass the model the EMA was built from"
            )
        for name, a in mine.items():
            c = theirs[name].detach()
            if a.is_floating_point():
                avg_f.append(a)
                cur_f.append(c)
            else:
                other.append((a, c))
        return avg_f, cur_f, other

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` into the average."""
        self.num_updates += 1
        decay = self.decay
        if self.warmup:
            t = self.num_updates
            decay = min(decay, (1.0 + t) / (10.0 + t))
        if self._cache is None or self._cache[0] is not model:
            self._cache = (model, *self._pairs(model))
        _, avg_f, cur_f, other = self._cache
        if avg_f:
            torch._foreach_lerp_(avg_f, cur_f, 1.0 - decay)
        for a, c in other:
            a.copy_(c)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (e.g. before exporting it)."""
        model.load_state_dict(self.module.state_dict())

    def get_extra_state(self) -> Any:
        return {"num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup}

    def set_extra_state(self, state: Any) -> None:
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the averaged module."""
        return self.module(*args, **kwargs)
