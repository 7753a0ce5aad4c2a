"""Shared pieces of the flowMC examples: the training loop (library parts composed: an
``MLPEnergy``, ``ContrastiveDivergence`` and one negative sampler), the negative samplers
compared (short-run ULA, PCD, flowMC) and mode-weight estimates of a learned energy.

Methods (all train E_theta with the CD loss
L = mean E(x+) - mean E(x-) + alpha * (mean E(x+)^2 + mean E(x-)^2)):

* ``ula``: short-run ULA, ``n_local`` steps from uniform noise on the data box, every step;
* ``pcd``: persistent chains started at the data, ``n_local`` ULA steps per training step;
* ``flowmc``: persistent chains started at the data; one FlowMC round per training step
  (``n_local`` MALA steps + ``n_global`` RealNVP proposals), the flow fitted to the chains
  by maximum likelihood (``FlowMC.update``) once per training step;
* ``flowmc_tilted``: the energy tilted by the flow, E = E_theta - log q (``TiltedEnergy``);
  the flow is fitted to the data (``tilt_pretrain`` Adam steps, before training, untimed)
  and then frozen; FlowMC samples the tilted energy.

Outputs (``example_output``): ``runs/examples/results/<name>.json`` and
``runs/examples/figures/<name>.png`` by default, ``docs/`` with ``--update-docs``, or
``--out FOLDER``; ``load_config`` reads these flags and ``save_json`` / ``figure_path`` /
``load_json`` use the folder it chose.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from example_output import DOCS_DIR, RUNS_DIR, add_output_arguments, output_dir, report_written
from torch import Tensor

from ebmflow.energy import EnergyModel, MLPEnergy, TiltedEnergy
from ebmflow.flows import FlowMC, RealNVP
from ebmflow.losses import ContrastiveDivergence
from ebmflow.samplers import MALA, Langevin, PersistentSampler, ReplayBuffer, Sampler
from ebmflow.spaces import Continuous

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ula", "pcd", "flowmc", "flowmc_tilted")
# the folder holding results/ and figures/, chosen by load_config (--out, --update-docs); kept
# out of the config so that the JSON written stays the same wherever it goes
_OUT: dict[str, Path] = {"dir": RUNS_DIR}


def load_config(defaults: dict[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
    """Defaults, overridden by the ``[example]`` table of ``--config file.toml`` (its ``[train]``
    table is for ``ebmflow train``; see docs/cli.md); ``--quick`` applies ``[example.quick]``."""
    import argparse

    from ebmflow.cli import load_example_settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="a < 1 minute CPU run")
    parser.add_argument(
        "--plot-only",
        action="store_true",
        help="redraw the figure from the saved JSON, no training",
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    _OUT["dir"] = output_dir(args)
    cfg = {k: v for k, v in defaults.items() if k != "quick"}
    quick = dict(defaults.get("quick", {}))
    if args.config is not None:
        loaded = dict(load_example_settings(args.config))
        quick.update(loaded.pop("quick", {}))
        cfg.update(loaded)
    if args.quick:
        cfg.update(quick)
    cfg["quick_mode"] = args.quick
    cfg["plot_only"] = args.plot_only
    torch.set_num_threads(int(cfg.get("threads", 1)))
    return cfg


def make_sampler(
    method: str,
    model: EnergyModel,
    data: Tensor,
    cfg: dict[str, Any],
    box: float,
    gen: torch.Generator,
) -> tuple[EnergyModel, Sampler, ContrastiveDivergence]:
    """The library composition for one method: (energy to train, sampler, CD loss).

    ``ula``: ``Langevin`` from uniform noise on [-box, box]^D (``ContrastiveDivergence``
    ``init`` callable); ``pcd``: ``PersistentSampler(Langevin, ReplayBuffer)`` whose
    ``batch_size`` slots start at data points and are never re-initialised; ``flowmc*``:
    ``FlowMC(RealNVP, MALA)`` with persistent chains started at data points.
    """
    dim = data.shape[1]
    batch = cfg["batch_size"]
    start = data[torch.randperm(data.shape[0], generator=gen)[:batch]].clone()
    alpha = cfg["alpha"]
    if method == "ula":

        def uniform_box(x: Tensor, g: torch.Generator | None) -> Tensor:
            return (torch.rand(x.shape, generator=g) * 2 - 1) * box

        sampler: Sampler = Langevin(cfg["ula_step"], n_steps=cfg["n_local"])
        return model, sampler, ContrastiveDivergence(alpha, init=uniform_box)
    if method == "pcd":
        buffer = ReplayBuffer(Continuous(dim), capacity=batch, reinit_prob=0.0)
        buffer.states = start
        sampler = PersistentSampler(Langevin(cfg["ula_step"], n_steps=cfg["n_local"]), buffer)
        return model, sampler, ContrastiveDivergence(alpha)
    flow = RealNVP(dim, n_layers=cfg["flow_layers"], hidden=tuple(cfg["flow_hidden"]))
    flow.init_from_data(data)
    energy: EnergyModel = model
    flow_steps = cfg["flow_steps"]
    if method == "flowmc_tilted":
        # the flow is a model of the data (fitted once, then frozen) and E_theta corrects it;
        # fitting it to the chains of p ∝ q exp(-E_theta) instead feeds the tilt back into q
        # (q <- q exp(-E_theta) at every fit) and the model collapses
        flow.fit(data, cfg.get("tilt_pretrain", 500), lr=cfg["flow_lr"], generator=gen)
        energy, flow_steps = TiltedEnergy(model, flow), 0
    n_local = cfg.get("flowmc_n_local", cfg["n_local"])
    sampler = FlowMC(
        flow,
        MALA(cfg["mala_step"], n_warmup=cfg.get("mala_warmup", 200)),
        n_local=n_local,
        n_global=cfg["n_global"],
        lr=cfg["flow_lr"],
        flow_steps=flow_steps,
    )
    sampler.update(energy, start)  # the chains start at the data; first flow fit
    return energy, sampler, ContrastiveDivergence(alpha)


def train(
    method: str,
    data_fn: Callable[[int, torch.Generator], Tensor],
    dim: int,
    cfg: dict[str, Any],
    evaluate: Callable[[EnergyModel], Tensor],
    box: float,
    seed: int = 0,
    chain_labels: Callable[[Tensor], Tensor] | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train an MLP energy with one negative sampler; returns the history and the energy.

    Per iteration: ``sampler.update`` (flowMC: one flow fit on the chains), then
    ``ContrastiveDivergence(alpha)`` with the sampler's negatives, one Adam step.
    Only every ``eval_every`` iterations (untimed): ``evaluate(energy) -> (K,)`` mode weights
    of the learned density, the fraction of negatives per mode (``chain_labels(x) -> (B,)``
    long), and the sampler's acceptance stats; ``on_eval(history)`` is then called (e.g. to
    write partial results).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = data_fn(cfg["n_data"], gen)
    model = MLPEnergy(Continuous(dim), hidden=tuple(cfg["hidden"]))
    energy, sampler, loss_fn = make_sampler(method, model, data, cfg, box, gen)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    batch = cfg["batch_size"]
    hist: dict[str, Any] = {
        "steps": [],
        "weights": [],
        "times": [],
        "chain_weights": [],
        "global_accept": [],
        "local_accept": [],
    }
    elapsed, x_neg = 0.0, None
    for it in range(cfg["iters"] + 1):
        if it % cfg["eval_every"] == 0 or it == cfg["iters"]:
            with torch.no_grad():
                hist["weights"].append(evaluate(energy).tolist())
            hist["steps"].append(it)
            hist["times"].append(elapsed)
            if chain_labels is not None and x_neg is not None:
                k = len(hist["weights"][-1])
                counts = torch.bincount(chain_labels(x_neg), minlength=k).float()
                hist["chain_weights"].append((counts / counts.sum()).tolist())
            else:
                hist["chain_weights"].append(None)
            for key in ("global_accept", "local_accept"):
                val = sampler.stats.get(key)
                hist[key].append(None if val is None else float(val))
            if on_eval is not None:
                on_eval(hist)
        if it == cfg["iters"]:
            break
        t0 = time.perf_counter()
        x_pos = data[torch.randint(0, data.shape[0], (batch,), generator=gen)]
        if it > 0 and isinstance(sampler, FlowMC):
            sampler.update(energy, generator=gen)
        out = loss_fn(energy, x_pos, sampler, generator=gen)
        x_neg = out.x_neg
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        elapsed += time.perf_counter() - t0
    return {**hist, "energy": energy}


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


def out_dir() -> Path:
    """The folder holding results/ and figures/ (``runs/examples`` unless ``--out`` or
    ``--update-docs`` was given to ``load_config``)."""
    return _OUT["dir"]


def results_path(name: str) -> Path:
    return out_dir() / "results" / f"{name}.json"


def save_json(name: str, payload: dict[str, Any]) -> Path:
    path = results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def load_json(name: str) -> dict[str, Any]:
    """The saved results ``name`` from the output folder, else the committed docs/results."""
    path = results_path(name)
    if not path.is_file():
        path = DOCS_DIR / "results" / f"{name}.json"
    return json.loads(path.read_text())


def figure_path(name: str) -> Path:
    path = out_dir() / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def report(name: str, plot_only: bool = False) -> None:
    """Print where the run wrote (the JSON unless only the figure was redrawn, the figure)."""
    report_written(*(() if plot_only else (results_path(name),)), figure_path(name))
