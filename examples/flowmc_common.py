"""Shared pieces of the flowMC examples: the training loop (plain torch), the three negative
samplers compared (short-run ULA, PCD, flowMC) and mode-weight estimates of a learned energy.

Methods (all train E_theta by maximum likelihood, grad = E_data[grad E] - E_model[grad E]):

* ``ula``: short-run ULA, ``n_local`` steps from uniform noise on the data box, every step;
* ``pcd``: persistent chains started at the data, ``n_local`` ULA steps per training step;
* ``flowmc``: persistent chains started at the data; one FlowMC round per training step
  (``n_local`` MALA steps + ``n_global`` RealNVP proposals), the flow fitted to the chains
  by maximum likelihood (``FlowMC.update``) once per training step;
* ``flowmc_tilted``: the same sampler, with the energy tilted by the flow,
  E = E_theta - log q (``TiltedEnergy``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ebmflow.energy import EnergyModel, MLPEnergy, TiltedEnergy
from ebmflow.flows import FlowMC, RealNVP
from ebmflow.samplers import MALA, Langevin
from ebmflow.spaces import Continuous

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ula", "pcd", "flowmc", "flowmc_tilted")


def load_config(defaults: dict[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
    """Defaults, overridden by ``--config file.toml``; ``--quick`` applies ``[quick]``."""
    import argparse

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="a < 1 minute CPU run")
    args = parser.parse_args(argv)
    cfg = {k: v for k, v in defaults.items() if k != "quick"}
    quick = dict(defaults.get("quick", {}))
    if args.config is not None:
        loaded = tomllib.loads(args.config.read_text())
        quick.update(loaded.pop("quick", {}))
        cfg.update(loaded)
    if args.quick:
        cfg.update(quick)
    cfg["quick_mode"] = args.quick
    torch.set_num_threads(int(cfg.get("threads", 1)))
    return cfg


def train(
    method: str,
    data_fn: Callable[[int, torch.Generator], Tensor],
    dim: int,
    cfg: dict[str, Any],
    evaluate: Callable[[EnergyModel], Tensor],
    box: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Train an MLP energy with one negative sampler; returns the history and the energy.

    ``evaluate(energy) -> (K,)`` estimated mode weights, recorded every ``eval_every`` steps.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = data_fn(cfg["n_data"], gen)
    model = MLPEnergy(Continuous(dim), hidden=tuple(cfg["hidden"]))
    flow = None
    energy: EnergyModel = model
    if method.startswith("flowmc"):
        flow = RealNVP(dim, n_layers=cfg["flow_layers"], hidden=tuple(cfg["flow_hidden"]))
        flow.init_from_data(data)
        if method == "flowmc_tilted":
            energy = TiltedEnergy(model, flow)
        sampler = FlowMC(flow, MALA(cfg["mala_step"], n_warmup=cfg["n_local"] * 20),
                         n_local=cfg["n_local"], n_global=cfg["n_global"], lr=cfg["flow_lr"],
                         flow_steps=cfg["flow_steps"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    ula = Langevin(cfg["ula_step"])
    batch = cfg["batch_size"]
    chains = data[torch.randperm(data.shape[0], generator=gen)[:batch]].clone()
    steps, weights, times = [], [], []
    elapsed = 0.0
    for it in range(cfg["iters"] + 1):
        if it % cfg["eval_every"] == 0:
            with torch.no_grad():
                weights.append(evaluate(energy).tolist())
            steps.append(it)
            times.append(elapsed)
        if it == cfg["iters"]:
            break
        t0 = time.perf_counter()
        x_pos = data[torch.randint(0, data.shape[0], (batch,), generator=gen)]
        if method == "ula":
            x0 = (torch.rand(batch, dim, generator=gen) * 2 - 1) * box
            x_neg = ula.run(energy, x0, cfg["n_local"], generator=gen)
        elif method == "pcd":
            chains = ula.run(energy, chains, cfg["n_local"], generator=gen)
            x_neg = chains
        else:
            if it == 0:
                sampler.update(energy, chains)  # chains start at the data
            else:
                sampler.update(energy, generator=gen)
            x_neg = sampler.sample(energy, generator=gen)
        e = energy(torch.cat([x_pos, x_neg]))
        e_pos, e_neg = e[:batch], e[batch:]
        loss = e_pos.mean() - e_neg.mean() + cfg["alpha"] * (e_pos.square().mean()
                                                              + e_neg.square().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        elapsed += time.perf_counter() - t0
    out = {"steps": steps, "weights": weights, "times": times, "energy": energy}
    if method.startswith("flowmc"):
        out["global_accept"] = float(sampler.stats["global_accept"])
        out["local_accept"] = float(sampler.stats["local_accept"])
    return out


def grid(box: float, n: int) -> tuple[Tensor, float]:
    lin = torch.linspace(-box, box, n)
    xx, yy = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1), float(lin[1] - lin[0]) ** 2


def quadrature_weights(energy: EnergyModel, labels: Tensor, points: Tensor, k: int) -> Tensor:
    """Mode weights of p ∝ exp(-E) by quadrature on 2-D grid points with given labels."""
    logp = -energy(points)
    p = torch.softmax(logp, 0)
    return torch.zeros(k).index_add_(0, labels, p)


def importance_weights(energy: EnergyModel, target, n: int, gen: torch.Generator) -> Tensor:
    """Mode weights of p ∝ exp(-E) by self-normalised importance sampling with the true
    mixture as proposal: w_i ∝ exp(-E(x_i)) / p_true(x_i), x_i ~ p_true; label = component."""
    x, labels = target.sample_with_labels(n, gen)
    log_w = -energy(x) - target.log_prob(x)
    w = torch.softmax(log_w, 0)
    return torch.zeros(target.num_components).index_add_(0, labels, w)


def out_name(name: str, cfg: dict[str, Any]) -> str:
    """Quick runs write beside the full results, never over them."""
    return f"{name}_quick" if cfg.get("quick_mode") else name


def save_json(name: str, payload: dict[str, Any]) -> Path:
    path = ROOT / "docs" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def figure_path(name: str) -> Path:
    path = ROOT / "docs" / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
