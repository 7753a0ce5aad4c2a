"""Energy discrepancy on a 16-dimensional, 5-state categorical toy.

A 2-D toy point is written as 8 base-5 digits per coordinate (``ebmflow.data.base_encode``),
giving states in {0, ..., 4}^16. An ``MLPEnergy`` on ``Categorical(16, 5)`` is trained with

* ED-Grid: ``EnergyDiscrepancy(GridPerturbation(num_classes=5), m=32)``;
* ED-uniform / ED-ordinal: ``EnergyDiscrepancy(CategoricalPerturbation(5, kind, t), m=32)``,
  the heat kernels exp(t L) of the complete graph and of the path 0 - 1 - 2 - 3 - 4;
* PCD with random-scan ``Gibbs`` chains (the contrastive-divergence baseline).

Evaluation as in ``ed_discrete_toys.py``: NLL with log Z by importance sampling over uniform
states (log Z = log mean exp(-E(u)) + 16 log 5; the uniform model has NLL 16 log 5 = 25.75),
and the exp(-0.1 Hamming) MMD against Gibbs samples.

    python examples/ed_categorical.py --quick    # 150 iterations (< 1 min)
    python examples/ed_categorical.py            # the config's iterations

Writes runs/examples/figures/ed_categorical.png and runs/examples/results/ed_categorical.json
(``--update-docs``: docs/figures and docs/results) and prints where.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ed_discrete_toys import ROOT, Task, parse, run, save  # noqa: E402

from ebmflow.data import base_decode, base_encode  # noqa: E402
from ebmflow.spaces import Categorical  # noqa: E402

CONFIG = ROOT / "examples" / "configs" / "ed_categorical.toml"


def base_task(data_cfg: dict) -> Task:
    k, digits, lo, hi = (data_cfg[key] for key in ("num_classes", "digits", "low", "high"))
    return Task(Categorical(2 * digits, k), lambda x: base_encode(x, k, digits, lo, hi),
                lambda c: base_decode(c, k, digits, lo, hi))


def main(argv: list[str] | None = None) -> dict:
    args, cfg, datasets, iterations = parse(argv, __doc__.split("\n")[0], CONFIG,
                                            "ed_grid,ed_uniform,ed_ordinal,pcd")
    torch.set_num_threads(1)

    def make_task(ds: str) -> Task:
        return base_task(cfg["data"])

    results = run(cfg, args.methods.split(","), datasets, iterations, make_task)
    results["quick"] = args.quick
    return save(results, "ed_categorical" + ("_quick" if args.quick else ""), args.out,
                make_task, args.merge)


if __name__ == "__main__":
    main()
