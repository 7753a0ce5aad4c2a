"""The example of docs/discrete-flows.md runs as written and reaches the total variation the page
states (exact law of the trained flow's chain by enumeration)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from test_discrete_flows_training import euler_law

PAGE = Path(__file__).resolve().parents[1] / "docs" / "discrete-flows.md"


def example_block() -> str:
    text = PAGE.read_text()
    section = text[text.index("## Example"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "docs/discrete-flows.md: no python block under ## Example"
    return blocks[0]


def test_page_names_the_stats_the_sampler_returns():
    text = PAGE.read_text()
    for name in re.findall(r"`(ess\w*)`", text):
        assert name in {"ess", "ess_fraction", "ess_threshold"}, name


def test_example_runs_as_written_and_reaches_tv_below_01():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scope: dict = {}
        exec(compile(example_block(), str(PAGE), "exec"), scope)  # noqa: S102 - the page's code
    finally:
        torch.set_num_threads(threads)
    flow, target, x, stats = scope["flow"], scope["target"], scope["x"], scope["stats"]
    assert x.shape == (1000, 9) and set(x.unique().tolist()) <= {0.0, 1.0}
    assert {"ess", "ess_fraction"} <= set(stats)
    law = euler_law(flow.velocity, flow.solver, 9)
    tv = 0.5 * (law - target.probabilities()).abs().sum().item()
    assert tv < 0.1, tv  # the page: 0.055 for this seed
