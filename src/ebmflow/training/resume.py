"""Which settings a resumed run uses: the checkpoint's state, or the arguments you changed.

A checkpoint restores the sampler's, the loss's and the EMA's plain attributes (numbers such
as ``n_steps``, ``step_size``, ``reinit_prob``, adaptation counters), so that a resumed run
continues exactly. The Trainer also records those attributes as they were when it was built
(its constructor arguments). On resume the rule is:

* an attribute whose value at construction differs between the saved run and this one was
  changed on purpose: **the new constructor value wins**, with a warning naming it, the old
  and the new value;
* every other attribute takes the checkpoint's value (including what the sampler adapted,
  such as MALA's step size after warm-up).

Checkpoints written before this record existed cannot tell the two apart: there the
checkpoint wins, and every attribute whose restored value differs from the new object's is
named in a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

__all__ = ["scalar_attributes", "apply_changed_arguments"]

_SCALARS = (bool, int, float, str)


def scalar_attributes(module: nn.Module | None) -> dict[str, dict[str, Any]]:
    """Public number/string/None attributes of ``module`` and its submodules, keyed by
    submodule name ("." for the module itself)."""
    if module is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, m in module.named_modules():
        attrs = {k: v for k, v in vars(m).items()
                 if not k.startswith("_") and k != "training" and (v is None or isinstance(v, _SCALARS))}
        if attrs:
            out[name or "."] = attrs
    return out


def _label(what: str, sub: str, key: str) -> str:
    return f"{what}.{key}" if sub == "." else f"{what}.{sub}.{key}"


def apply_changed_arguments(module: nn.Module, what: str, built: dict[str, dict[str, Any]],
                            saved_built: dict[str, dict[str, Any]] | None,
                            before_load: dict[str, dict[str, Any]]) -> list[str]:
    """After a checkpoint restored ``module`` (the sampler, loss or EMA), apply the rule above.

    Args:
        module: the restored module.
        what: its name in messages ("sampler", "loss", "ema").
        built: this run's attributes at construction (``scalar_attributes`` then).
        saved_built: the saved run's attributes at construction, or None (older checkpoint).
        before_load: this run's attributes just before the checkpoint was loaded.

    Returns the warning lines (already emitted as one ``UserWarning``).
    """
    mods = dict(module.named_modules())
    restored = scalar_attributes(module)
    lines: list[str] = []
    if saved_built is not None:
        for sub, attrs in built.items():
            old_attrs = saved_built.get(sub, {})
            target = mods.get("" if sub == "." else sub)
            for key, new in attrs.items():
                if key in old_attrs and old_attrs[key] != new and target is not None:
                    setattr(target, key, new)
                    lines.append(f"{_label(what, sub, key)}: checkpoint {old_attrs[key]!r} -> "
                                 f"using the new argument {new!r}")
        rule = "arguments changed since the saved run win over the checkpoint"
    else:
        for sub, attrs in before_load.items():
            for key, new in attrs.items():
                old = restored.get(sub, {}).get(key, new)
                if old != new:
                    lines.append(f"{_label(what, sub, key)}: this run's {new!r} -> using the "
                                 f"checkpoint's {old!r}")
        rule = ("this checkpoint does not record the saved run's arguments, so its values win; "
                "set the attribute after load_checkpoint() to change it")
    if lines:
        warnings.warn(f"resuming: {what} settings differ from the checkpoint ({rule}): "
                      + "; ".join(lines), UserWarning, stacklevel=4)
    return lines
