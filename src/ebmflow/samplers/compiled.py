"""The compiled-block executor, for transitions written outside ``ebmflow.samplers``.

``MCMCSampler(compile=...)`` uses it internally; ``FlowMC`` (``ebmflow.flows``) compiles its
global moves with the same pieces. They live in the private module ``_compiled``; this module
is their public name for other packages (docs/design.md: no package uses another's private
names). The "Compiled chains" page of the docs explains how a block draws its noise.
"""

from __future__ import annotations

from ._compiled import (
    CompiledBlock,
    CompileFallbackWarning,
    compile_available,
    predraw,
    warn_fallback,
)

__all__ = ["CompiledBlock", "CompileFallbackWarning", "compile_available", "predraw", "warn_fallback"]
