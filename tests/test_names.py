"""One name, one meaning: the renamed keywords and functions, their deprecation paths, and the
single implementations of shared computations (see docs/design.md, "Names")."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "ebmflow"


def _sources() -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text() for p in sorted(SRC.rglob("*.py"))}


# -- effective sample size: one public function, in ebmflow.metrics -----------------------

def test_ess_formula_written_once():
    """The Kish ESS is computed in metrics/ess.py only; everything else calls it."""
    pattern = re.compile(r"logsumexp\(\s*2|1(\.0)?\s*/\s*[\w.]+\.pow\(2\)\.sum\(\)")
    where = [name for name, text in _sources().items() if pattern.search(text)]
    assert where == ["metrics/ess.py"], where


def test_discrete_flows_ess_is_deprecated_alias_of_metrics():
    from ebmflow.discrete_flows import effective_sample_size as old
    from ebmflow.metrics import effective_sample_size

    lw = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match=r"ebmflow\.metrics\.effective_sample_size"):
        value = old(lw)
    assert torch.equal(value, effective_sample_size(lw))


def test_importance_weights_ess_matches_metrics():
    from ebmflow.discrete_flows import importance_weights
    from ebmflow.metrics import effective_sample_size

    g = torch.Generator().manual_seed(1)
    e, log_q = torch.randn(32, generator=g), torch.randn(32, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        _, stats = importance_weights(e, log_q, temperature=2.0)
    lw = -e / 2.0 - log_q
    assert torch.equal(stats["ess"], effective_sample_size(lw))
    assert torch.equal(stats["ess_fraction"], effective_sample_size(lw, normalized=True))
