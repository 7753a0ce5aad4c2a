"""Contract tests for every registered MCMC sampler, plus the MCMCSampler base machinery."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from _sampler_cases import SAMPLER_CASES, SamplerCase
from torch import Tensor

from ebmflow.energy import EnergyModel, GaussianMixtureEnergy
from ebmflow.samplers import ChainState, MCMCSampler, NonFiniteError, Sampler
from ebmflow.spaces import Binary, Continuous

CASES = [pytest.param(c, id=c.id) for c in SAMPLER_CASES]


# -- contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_signature(case: SamplerCase) -> None:
    sampler = case.make_sampler()
    assert isinstance(sampler, MCMCSampler) and isinstance(sampler, Sampler)
    params = inspect.signature(sampler.sample).parameters
    assert list(params)[:2] == ["energy", "n"]
    for name in ("x0", "generator"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    run = inspect.signature(sampler.run).parameters
    assert list(run)[:3] == ["energy", "x0", "n_steps"]
    assert sampler.update(case.make_target()) == {}


@pytest.mark.parametrize("case", CASES)
def test_shape_dtype_device_and_stats(case: SamplerCase, gen: torch.Generator) -> None:
    sampler, target = case.make_sampler(), case.make_target()
    x0 = case.exact_sample(target, 7, gen)
    x = sampler.sample(target, x0=x0, generator=gen, n_steps=3)
    assert x.shape == x0.shape and x.dtype == x0.dtype and x.device == x0.device
    assert not x.requires_grad
    for k, v in sampler.stats.items():
        assert isinstance(v, Tensor) and v.dim() == 0, k
    for k, v in sampler.chain_stats.items():
        assert v.shape == (7,), k
    assert sampler.last_state is not None and torch.equal(sampler.last_state.x, x)
    y = sampler.sample(target, 5, generator=gen, n_steps=2)  # from the space's noise
    assert y.shape == (5, *target.space.shape)


@pytest.mark.parametrize("case", CASES)
def test_deterministic_under_seed(case: SamplerCase) -> None:
    target = case.make_target()
    runs = [case.make_sampler().sample(target, 64, generator=torch.Generator().manual_seed(3),
                                       n_steps=4) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = case.make_sampler().sample(target, 64, generator=torch.Generator().manual_seed(4),
                                       n_steps=4)
    assert not torch.equal(runs[0], other)


@pytest.mark.parametrize("case", CASES)
def test_leaves_target_invariant(case: SamplerCase, gen: torch.Generator) -> None:
    """Chains started from exact samples are still exact after n_steps (within MC error)."""
    sampler, target = case.make_sampler(), case.make_target()
    n = case.n_chains
    x = sampler.run(target, case.exact_sample(target, n, gen), case.n_steps, generator=gen)
    ref = case.exact_sample(target, n, gen)
    s_x, s_ref = case.statistic(x).double(), case.statistic(ref).double()
    se = torch.sqrt((s_x.var(0) + s_ref.var(0)) / n)
    gap = (s_x.mean(0) - s_ref.mean(0)).abs()
    tol = case.z * se + (0.0 if case.exact else case.bias_tol)
    assert bool((gap < tol).all()), f"{case.id}: gap {gap.tolist()} > tol {tol.tolist()}"


# -- base machinery ------------------------------------------------------------------------
class RandomWalk(MCMCSampler):
    """Random-walk Metropolis written with step() only (the docstring's example)."""

    def __init__(self, scale: float = 0.5, **kw):
        super().__init__(**kw)
        self.scale = scale

    def step(self, energy, x, generator=None):
        prop = x + self.scale * torch.randn(x.shape, generator=generator, device=x.device)
        log_alpha = energy(x) - energy(prop)
        u = torch.rand(x.shape[0], generator=generator, device=x.device)
        accept = u.log() < log_alpha
        return torch.where(accept[:, None], prop, x), {"accept_rate": accept.float()}


class NaNBeyond(EnergyModel):
    """0.5 |x|^2, but NaN where x_0 > 5 (a broken energy)."""

    def __init__(self) -> None:
        super().__init__(Continuous(2))

    def energy(self, x: Tensor) -> Tensor:
        e = 0.5 * x.square().sum(-1)
        return torch.where(x[:, 0] > 5, torch.full_like(e, math.nan), e)


class Drift(MCMCSampler):
    """Deterministic x' = x + 1 (moves chain 3 into the NaN region at step 1)."""

    def step(self, energy, x, generator=None):
        x = x + 1.0
        return x + 0.0 * energy(x)[:, None]


def test_step_only_subclass_gets_run_and_stats(gen: torch.Generator) -> None:
    target = GaussianMixtureEnergy(torch.zeros(1, 2), 1.0)
    s = RandomWalk(n_steps=200)
    x = s.sample(target, 2000, generator=gen)
    assert abs(float(x.var()) - 1.0) < 0.1
    assert 0.2 < float(s.stats["accept_rate"]) < 0.95
    assert s.chain_stats["accept_rate"].shape == (2000,)
    assert float(s.stats["nonfinite"]) == 0


def test_nonfinite_raises_naming_step_and_chains() -> None:
    x0 = torch.zeros(6, 2)
    x0[3, 0] = 4.5  # 5.5 after one step: NaN energy -> NaN state via the energy term
    with pytest.raises(NonFiniteError, match=r"step 0 \(chains \[3\]\)"):
        Drift(n_steps=3).run(NaNBeyond(), x0)


def test_nonfinite_reset_undoes_and_counts() -> None:
    x0 = torch.zeros(6, 2)
    x0[3, 0] = 4.5
    s = Drift(n_steps=3, on_nonfinite="reset")
    x = s.run(NaNBeyond(), x0)
    assert torch.isfinite(x).all()
    assert float(s.stats["nonfinite"]) == 3  # chain 3 is stuck and counted at every step
    assert torch.equal(x[3], x0[3]) and torch.equal(x[0], torch.full((2,), 3.0))


def test_bad_arguments() -> None:
    target = GaussianMixtureEnergy(torch.zeros(1, 2), 1.0)
    with pytest.raises(ValueError, match="n_steps"):
        RandomWalk(n_steps=-1)
    with pytest.raises(ValueError, match="on_nonfinite"):
        RandomWalk(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="graph_steps"):
        RandomWalk(graph_steps=0)
    with pytest.raises(ValueError, match="shape"):
        RandomWalk().run(target, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="EnergyModel"):
        RandomWalk().sample(lambda x: x, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n="):
        RandomWalk().sample(target, 3, x0=torch.zeros(4, 2))


def test_cuda_graph_flag_is_a_no_op_on_cpu(gen: torch.Generator) -> None:
    target = GaussianMixtureEnergy(torch.zeros(1, 2), 1.0)
    a = RandomWalk(n_steps=5).sample(target, 8, generator=torch.Generator().manual_seed(1))
    b = RandomWalk(n_steps=5, cuda_graph=True).sample(target, 8,
                                                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_chain_state_replace() -> None:
    s = ChainState(torch.zeros(2, 1))
    t = s.replace(energy=torch.ones(2))
    assert s.energy is None and torch.equal(t.energy, torch.ones(2))


def test_space_mismatch_is_value_error() -> None:
    from ebmflow.energy import MLPEnergy
    from ebmflow.samplers import MALA

    with pytest.raises(ValueError, match="cannot sample Binary"):
        MALA().sample(MLPEnergy(Binary(4), hidden=(8,)), 3)


# -- CUDA fast path (skipped without a GPU) -------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES)
def test_cuda_graph_matches_eager(case: SamplerCase) -> None:
    target = case.make_target().cuda()
    x0 = case.exact_sample(target, 256, torch.Generator(device="cuda").manual_seed(0))
    outs = []
    for graph in (False, True):
        s = case.make_sampler()
        s.cuda_graph, s.graph_steps = graph, 4
        gen = torch.Generator(device="cuda").manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to eager would be a failure here
            outs.append((s.run(target, x0, 10, generator=gen), dict(s.stats)))
        if graph:  # second run replays the cached graph
            x2 = s.run(target, x0, 10, generator=torch.Generator(device="cuda").manual_seed(5))
            torch.testing.assert_close(x2, outs[1][0])
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-4, rtol=1e-4)
    for k, v in outs[0][1].items():
        torch.testing.assert_close(v, outs[1][1][k], atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_graph_default_generator_and_nonfinite() -> None:
    x0 = torch.zeros(6, 2, device="cuda")
    x0[3, 0] = 4.5
    energy = NaNBeyond().cuda()
    with pytest.raises(NonFiniteError, match=r"step 0 \(chains \[3\]\)"):
        Drift(n_steps=8, cuda_graph=True, graph_steps=4).run(energy, x0)
    s = Drift(n_steps=8, on_nonfinite="reset", cuda_graph=True, graph_steps=4)
    assert float(s.stats.get("nonfinite", 0)) == 0
    x = s.run(energy, x0)
    assert float(s.stats["nonfinite"]) == 8 and torch.isfinite(x).all()


@pytest.mark.slow  # torch.compile takes 10-60 s per sampler on CPU
def test_compile_gives_the_same_chains_as_eager() -> None:
    import torch._dynamo

    from ebmflow.energy import MLPEnergy
    from ebmflow.samplers import MALA, Langevin

    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=(32, 32))
    x0 = torch.randn(64, 2)
    for cls in (Langevin, MALA):
        torch._dynamo.reset()
        out = []
        for compiled in (False, True):
            sampler = cls(step_size=0.01, compile=compiled)
            # warm-up: compiles the step (and once more when the step info starts being summed)
            sampler.run(energy, x0, 2, generator=torch.Generator().manual_seed(1))
            # then no recompilation however many steps (a per-step recompilation raises here)
            with torch._dynamo.config.patch(error_on_recompile=True):
                out.append(sampler.run(energy, x0, 12, generator=torch.Generator().manual_seed(0)))
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-5)
