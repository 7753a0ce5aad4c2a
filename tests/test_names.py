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


# -- step_size is an MCMC step size; dt the CTMC time step; ode_steps the ODE steps --------

def test_ctmc_solver_dt_and_deprecated_step_size():
    from ebmflow.discrete_flows import CTMCSolver, MixturePath
    from ebmflow.discrete_flows.solver import time_grid

    path = MixturePath(3)
    new = CTMCSolver(path, dt=0.1)
    assert new.dt == 0.1 and CTMCSolver(path, 0.1).dt == 0.1 and CTMCSolver(path).dt == 0.05
    with pytest.warns(DeprecationWarning, match=r"dt="):
        old = CTMCSolver(path, step_size=0.1)
    with pytest.warns(DeprecationWarning, match=r"CTMCSolver\.dt"):
        assert old.step_size == 0.1
    with pytest.raises(ValueError, match="dt"):
        CTMCSolver(path, dt=0.1, step_size=0.1)
    assert time_grid(0.0, new.dt) == time_grid(0.0, old.dt)

    def velocity(x, t):
        return torch.ones(*x.shape, 3) / 3

    x0 = path.sample_source(8, 4)
    a = new.sample(velocity, x0, generator=torch.Generator().manual_seed(0), return_log_prob=True)
    b = old.sample(velocity, x0, generator=torch.Generator().manual_seed(0), return_log_prob=True)
    assert torch.equal(a.x, b.x) and torch.equal(a.log_prob, b.log_prob)


def test_continuous_flow_ode_steps_and_deprecated_n_steps():
    from ebmflow.flows import ContinuousFlow

    torch.manual_seed(0)
    new = ContinuousFlow(2, hidden=(8,), ode_steps=3)
    with pytest.warns(DeprecationWarning, match=r"ode_steps="):
        old = ContinuousFlow(2, hidden=(8,), n_steps=3)
    old.load_state_dict(new.state_dict())
    assert new.ode_steps == old.ode_steps == 3 and ContinuousFlow(2).ode_steps == 16
    with pytest.warns(DeprecationWarning, match=r"ode_steps"):
        assert old.n_steps == 3
    with pytest.raises(ValueError, match="ode_steps"):
        ContinuousFlow(2, ode_steps=3, n_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
        assert torch.equal(new.log_prob(x), old.log_prob(x))
        assert "ode_steps=3" in repr(new)


def test_flow_fit_steps_and_deprecated_n_steps():
    from ebmflow.flows import RealNVP

    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    a = RealNVP(2, n_layers=2, hidden=(8,))
    b = RealNVP(2, n_layers=2, hidden=(8,))
    b.load_state_dict(a.state_dict())
    la = a.fit(data, steps=5, generator=torch.Generator().manual_seed(2))
    with pytest.warns(DeprecationWarning, match=r"steps="):
        lb = b.fit(data, n_steps=5, generator=torch.Generator().manual_seed(2))
    assert la.shape == (5,) and torch.equal(la, lb)


def test_step_size_means_an_mcmc_step_size_only():
    """Every ``step_size`` parameter in the library belongs to an MCMC sampler (the CTMC
    solver's deprecated alias aside); every ``n_steps`` counts MCMC transitions (the
    deprecated aliases of ``ode_steps`` and ``Flow.fit(steps)`` aside)."""
    import ast

    deprecated = {("discrete_flows/solver.py", "step_size"), ("flows/continuous.py", "n_steps"),
                  ("flows/base.py", "n_steps")}
    mcmc_dirs = ("samplers/", "flows/flowmc.py", "discrete_flows/recipes.py", "metrics/ais.py",
                 "losses/contrastive_divergence.py", "training/", "cli.py")
    bad = []
    for rel, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                for a in args:
                    if a.arg in ("step_size", "n_steps") and (rel, a.arg) not in deprecated \
                            and not rel.startswith(mcmc_dirs):
                        bad.append(f"{rel}:{node.lineno} {node.name}({a.arg})")
    assert not bad, bad


# -- categorical draws: one helper, ebmflow.samplers.rng.categorical_sample ----------------

def test_categorical_sample_law_and_noise_tape():
    from ebmflow.samplers import rng

    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for kw in ({"logits": p.log()}, {"probs": 2 * p}, {"cdf": p.cumsum(0)}):
        args = {k: v.expand(40_000, 4) for k, v in kw.items()}
        x = rng.categorical_sample(**args, generator=torch.Generator().manual_seed(0))
        freq = torch.bincount(x, minlength=4).float() / x.numel()
        torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    # inside a compiled block the uniforms come from the tape
    u = torch.tensor([[0.05], [0.95]])
    x = rng.categorical_sample(probs=p.expand(2, 4), generator=rng.NoiseTape([u]))
    assert x.tolist() == [0, 3]
    with pytest.raises(ValueError, match="exactly one"):
        rng.categorical_sample(p.log(), probs=p)


def test_every_categorical_draw_goes_through_the_helper(monkeypatch):
    from ebmflow.discrete_flows import CTMCSolver, FactorizedProposal, MixturePath
    from ebmflow.energy import MLPEnergy
    from ebmflow.losses import CategoricalPerturbation
    from ebmflow.samplers import DiscreteLangevin, Gibbs, GibbsWithGradients, rng
    from ebmflow.spaces import Categorical

    calls = []
    real = rng.categorical_sample

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(rng, "categorical_sample", spy)
    gen = torch.Generator().manual_seed(0)
    energy = MLPEnergy(Categorical(3, 4), hidden=(8,))
    users = {
        "Gibbs": lambda: Gibbs(n_steps=1).sample(energy, 4, generator=gen),
        "GibbsWithGradients": lambda: GibbsWithGradients(n_steps=1).sample(energy, 4, generator=gen),
        "DiscreteLangevin": lambda: DiscreteLangevin(n_steps=1).sample(energy, 4, generator=gen),
        "CTMCSolver": lambda: CTMCSolver(MixturePath(4), dt=0.5).sample(
            lambda x, t: torch.ones(*x.shape, 4), MixturePath(4).sample_source(4, 3),
            generator=gen),
        "FactorizedProposal": lambda: FactorizedProposal.uniform(3, 4).sample(4, gen),
        "CategoricalPerturbation": lambda: CategoricalPerturbation(4).perturb(
            torch.zeros(4, 3, dtype=torch.long), gen),
    }
    for name, use in users.items():
        calls.clear()
        use()
        assert calls, f"{name} draws its categorical values without rng.categorical_sample"


# -- Flow.sample returns states, as Sampler.sample; sample_and_log_prob the pair --------------

def test_flow_sample_returns_states_only():
    from ebmflow.flows import RealNVP

    flow = RealNVP(3, n_layers=2, hidden=(8,))
    with torch.no_grad():
        x = flow.sample(5, torch.Generator().manual_seed(0))
        x2, log_q = flow.sample_and_log_prob(5, torch.Generator().manual_seed(0))
    assert isinstance(x, torch.Tensor) and x.shape == (5, 3)
    assert torch.equal(x, x2) and log_q.shape == (5,)
