"""The compiled executor of ``MCMCSampler.run``: same chains as eager, no recompilation.

Most tests compile with the ``eager`` / ``aot_eager`` backends (dynamo traces the K-step block
exactly as for inductor, without generating C++), which keeps them fast; the slow test runs
inductor itself.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
import warnings
from pathlib import Path

import pytest
import torch

import ebmflow.samplers.base as base_module
from ebmflow.energy import EnergyModel, GaussianMixtureEnergy, IsingEnergy, MLPEnergy
from ebmflow.samplers import (
    HMC,
    MALA,
    CompileFallbackWarning,
    DiscreteLangevin,
    Gibbs,
    GibbsWithGradients,
    Langevin,
    MCMCSampler,
    executors,
    rng,
)
from ebmflow.samplers._compiled import (
    INNERMOST_MAX,
    POOLED_STATE_MAX,
    CompiledBlock,
    chains_innermost,
    chains_outermost,
    inductor_options,
    predraw,
    whole_block_fill_is_exact,
)
from ebmflow.spaces import Binary, Categorical, Continuous


def _mixture() -> GaussianMixtureEnergy:
    return GaussianMixtureEnergy(
        torch.tensor([[-1.5, 0.0], [1.5, 0.5]]), torch.tensor([0.6, 0.8]), torch.tensor([0.7, 0.3])
    )


class QuarticEnergy(EnergyModel):
    """A user energy that defines only ``energy(x)`` (gradients by autograd / torch.func)."""

    def __init__(self) -> None:
        super().__init__(Continuous(2))
        self.a = torch.nn.Parameter(torch.tensor([0.5, 1.0]))

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a * x.square()).sum(1) + 0.1 * x.pow(4).sum(1)


def _binary_mlp() -> MLPEnergy:
    torch.manual_seed(3)
    return MLPEnergy(Binary(12), hidden=(16,))


def _categorical_mlp() -> MLPEnergy:
    torch.manual_seed(4)
    return MLPEnergy(Categorical(6, 3), hidden=(16,))


def _x0(energy: EnergyModel, n: int = 32) -> torch.Tensor:
    return energy.space.noise(n, generator=torch.Generator().manual_seed(11))


CASES = [
    ("langevin", lambda: Langevin(0.05), _mixture),
    ("mala", lambda: MALA(0.2), _mixture),
    ("mala-adapt", lambda: MALA(0.2, n_warmup=30), _mixture),
    ("hmc", lambda: HMC(0.2, n_leapfrog=3), _mixture),
    ("mala-user-energy", lambda: MALA(0.1), QuarticEnergy),
    ("gibbs-binary", lambda: Gibbs(), _binary_mlp),
    ("gibbs-categorical", lambda: Gibbs(), _categorical_mlp),
    ("gibbs-ising", lambda: Gibbs(), lambda: IsingEnergy.lattice(3, 0.3)),
    ("gwg-binary", lambda: GibbsWithGradients(), _binary_mlp),
    ("gwg-categorical", lambda: GibbsWithGradients(), _categorical_mlp),
    ("dula", lambda: DiscreteLangevin(0.3), _binary_mlp),
    ("dmala", lambda: DiscreteLangevin(0.3, metropolis=True), _binary_mlp),
    ("dmala-categorical", lambda: DiscreteLangevin(0.3, metropolis=True), _categorical_mlp),
]


def test_rng_draws_are_torch_draws() -> None:
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    torch.testing.assert_close(rng.randn((5, 3), g1, cpu), torch.randn((5, 3), generator=g2))
    torch.testing.assert_close(rng.rand((7,), g1, cpu), torch.rand((7,), generator=g2))
    torch.testing.assert_close(rng.randint(0, 9, (4, 1), g1, cpu),
                               torch.randint(0, 9, (4, 1), generator=g2))


def test_predraw_follows_the_eager_order() -> None:
    """K steps of (randn (B, D), rand (B,), randint) pre-drawn = the same draws made step by
    step, interleaved as the eager loop makes them."""
    rec = rng.RecordingTape(torch.Generator().manual_seed(5))
    cpu = torch.device("cpu")
    rng.randn((6, 3), rec, cpu)
    rng.rand((6,), rec, cpu)
    rng.randint(0, 4, (6, 1), rec, cpu)
    assert [d.kind for d in rec.spec] == ["randn", "rand", "randint"]
    k = 4
    bufs = predraw(rec.spec, k, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    for j in range(k):
        torch.testing.assert_close(bufs[0][j], torch.randn((6, 3), generator=g), rtol=0, atol=0)
        torch.testing.assert_close(bufs[1][j], torch.rand((6,), generator=g), rtol=0, atol=0)
        torch.testing.assert_close(bufs[2][j], torch.randint(0, 4, (6, 1), generator=g),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("kind,shape", [("randn", (256, 2)), ("randn", (7, 3)), ("rand", (5,)),
                                        ("randint", (6, 1))])
def test_whole_block_draws_only_where_they_equal_step_by_step_draws(kind, shape) -> None:
    """One call for a block's K draws is used only where it gives the eager numbers; either
    way predraw returns exactly the step-by-step draws."""
    rec = rng.RecordingTape(torch.Generator().manual_seed(5))
    cpu = torch.device("cpu")
    {"randn": lambda: rng.randn(shape, rec, cpu), "rand": lambda: rng.rand(shape, rec, cpu),
     "randint": lambda: rng.randint(0, 4, shape, rec, cpu)}[kind]()
    k = 8
    whole = whole_block_fill_is_exact(rec.spec, k)
    got = predraw(rec.spec, k, torch.Generator().manual_seed(9), whole=whole)[0]
    g = torch.Generator().manual_seed(9)
    want = torch.stack([rec.spec[0].fill(torch.empty(shape, dtype=got.dtype), g) for _ in range(k)])
    assert torch.equal(got, want)
    one_call = rec.spec[0].fill(torch.empty((k, *shape), dtype=got.dtype),
                                torch.Generator().manual_seed(9))
    assert whole == torch.equal(one_call, want)  # the check answers what it claims
    if kind == "randn" and shape == (256, 2):
        assert whole  # the common case (B x D a multiple of 16) takes the one-call path


def test_whole_block_draws_need_a_single_cpu_draw() -> None:
    rec = rng.RecordingTape(torch.Generator().manual_seed(5))
    rng.randn((256, 2), rec, torch.device("cpu"))
    rng.rand((256,), rec, torch.device("cpu"))
    assert not whole_block_fill_is_exact(rec.spec, 8)  # interleaved draws: step by step
    assert not whole_block_fill_is_exact(rec.spec[:1], 1)


def test_noise_tape_refuses_extra_draws() -> None:
    tape = rng.NoiseTape([torch.zeros(2)])
    tape.next()
    with pytest.raises(RuntimeError, match="same draws every step"):
        tape.next()


@pytest.mark.parametrize("name,make_sampler,make_energy", CASES, ids=[c[0] for c in CASES])
def test_compiled_chains_equal_eager_chains(name, make_sampler, make_energy) -> None:
    """21 steps = 1 recording step + 2 compiled blocks of 8 + 4 eager steps: every part of the
    executor is crossed, and the result must be the eager chain for the same generator."""
    torch._dynamo.reset()
    energy = make_energy()
    x0 = _x0(energy)
    out = {}
    for compiled in (False, True):
        s = make_sampler()
        s.compile = compiled
        s.compile_backend = "aot_eager" if "user" in name else "eager"
        g = torch.Generator().manual_seed(7)
        # a second run of the same layout starts compiled at step 0 (draws already known)
        x = s.run(energy, s.run(energy, x0, 21, generator=g), 21, generator=g)
        out[compiled] = (x, {k: v.clone() for k, v in s.stats.items()}, s)
    x_e, stats_e, _ = out[False]
    x_c, stats_c, s_c = out[True]
    assert s_c.compile_seconds is not None, "the compiled executor did not run"
    assert x_c.dtype == x_e.dtype and x_c.shape == x_e.shape
    if x_e.is_floating_point() and isinstance(energy.space, Continuous):
        torch.testing.assert_close(x_c, x_e, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(x_c, x_e)
    assert set(stats_c) == set(stats_e)
    for k in stats_e:
        torch.testing.assert_close(stats_c[k], stats_e[k], rtol=1e-5, atol=1e-5)
    if name == "mala-adapt":  # the adapted step size reached the sampler in both runs
        assert math.isclose(out[True][2].step_size, out[False][2].step_size, rel_tol=1e-5)
        assert out[True][2].step_size != 0.2


def test_no_recompilation_when_steps_data_or_parameter_values_change() -> None:
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=(8,))
    s = MALA(0.05, compile=True)
    s.compile_backend = counting
    g = torch.Generator().manual_seed(0)
    s.run(energy, torch.randn(16, 2), 17, generator=g)
    assert len(graphs) == 1
    for n_steps in (9, 25, 40):
        s.run(energy, torch.randn(16, 2), n_steps, generator=g)
    with torch.no_grad():
        for p in energy.parameters():
            p.mul_(1.1)
    s.run(energy, torch.randn(16, 2), 17, generator=g)
    assert len(graphs) == 1, f"{len(graphs)} compilations"
    # a new batch size is a new specialisation (one more graph), and nothing else
    s.run(energy, torch.randn(8, 2), 17, generator=g)
    assert len(graphs) == 2


def test_compile_auto_waits_until_it_pays() -> None:
    torch._dynamo.reset()
    energy = _mixture()
    s = Langevin(0.05, compile="auto")
    s.compile_backend = "eager"
    s.compile_after = 50
    x0 = _x0(energy)
    s.run(energy, x0, 20)
    assert s.compile_seconds is None  # 20 steps so far: eager
    s.run(energy, x0, 20)
    assert s.compile_seconds is None
    s.run(energy, x0, 20)  # 60 >= 50: compiled from now on
    assert s.compile_seconds is not None


class TorchRandnWalk(MCMCSampler):
    """A user sampler drawing with torch.randn directly (cannot take pre-drawn noise)."""

    def step(self, energy, x, generator=None):
        prop = x + 0.1 * torch.randn(x.shape, generator=generator)
        log_alpha = energy(x) - energy(prop)
        u = torch.rand(x.shape[0], generator=generator)
        return torch.where((u.log() < log_alpha)[:, None], prop, x)


def test_uncompilable_sampler_falls_back_with_a_warning() -> None:
    energy = _mixture()
    x0 = _x0(energy)
    eager = TorchRandnWalk().run(energy, x0, 12, generator=torch.Generator().manual_seed(1))
    s = TorchRandnWalk(compile=True)
    with pytest.warns(CompileFallbackWarning, match="ebmflow.samplers.rng"):
        x = s.run(energy, x0, 12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, eager)
    with warnings.catch_warnings():  # said once, then eager without a word
        warnings.simplefilter("error")
        s.run(energy, x0, 12)


def test_compile_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
        Langevin(compile="yes")


@pytest.mark.slow  # inductor compiles C++: tens of seconds per sampler on a small CPU
@pytest.mark.parametrize("kind", ["mlp", "mixture"])
@pytest.mark.parametrize("cls", [Langevin, MALA, HMC])
def test_inductor_chains_equal_eager_chains(cls, kind) -> None:
    """Inductor's kernels on chains-innermost 2-D states (the MLP's row-major gradient is
    transposed inside the block; the mixture's closed form keeps the layout)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=(32, 32)) if kind == "mlp" else _mixture()
    x0 = torch.randn(64, 2)
    out = []
    for compiled in (False, True):
        s = cls(step_size=0.01, compile=compiled)
        out.append(s.run(energy, x0, 20, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-4)


def test_cuda_graph_key_is_stable_across_runs() -> None:
    """The recorded-graph key must not change because a run happened (``last_state`` went
    from None to a state): otherwise the second run records a second graph."""
    from ebmflow.samplers._fast import graph_key

    energy = _mixture()
    s = MALA(0.1)
    before = graph_key(s, energy, (), 8, None)
    s.run(energy, _x0(energy), 3)
    assert graph_key(s, energy, (), 8, None) == before


@pytest.mark.parametrize("cls", [MALA, HMC])
def test_chains_under_autocast_are_exact_float32_chains(cls) -> None:
    """A loss under ``torch.autocast(bfloat16)`` calls its sampler: the chain must be the
    float32 chain (bf16 energies of size ~50 would reject exact moves by rounding alone)."""
    energy = GaussianMixtureEnergy(torch.tensor([[10.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    torch.manual_seed(0)
    mlp = MLPEnergy(Continuous(2), hidden=(16,))
    for target in (energy, mlp + energy):
        x0 = torch.zeros(64, 2)  # E ~ 50 at the start
        ref = cls(1e-4, n_steps=10)
        x_ref = ref.run(target, x0, generator=torch.Generator().manual_seed(0))
        s = cls(1e-4, n_steps=10)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = s.run(target, x0, generator=torch.Generator().manual_seed(0))
        assert x.dtype == torch.float32
        assert torch.equal(x, x_ref)
        assert float(s.stats["accept_rate"]) == float(ref.stats["accept_rate"])
        assert float(ref.stats["accept_rate"]) == 1.0  # eta = 1e-4: every exact move accepted


def test_graph_key_sees_energy_attributes() -> None:
    """A recorded graph bakes Python attributes of the energy in: changing one (a user's
    temperature) must change the key, so the graph is recorded again."""
    from ebmflow.samplers._fast import graph_key

    class Tempered(EnergyModel):
        def __init__(self) -> None:
            super().__init__(Continuous(2))
            self.inner = _mixture()
            self.temperature = 1.0

        def energy(self, x):
            return self.inner(x) / self.temperature

    energy, s = Tempered(), MALA(0.1)
    before = graph_key(s, energy, (), 8, None)
    energy.temperature = 2.0
    assert graph_key(s, energy, (), 8, None) != before


def test_ais_with_compiled_chains_reads_every_temperature() -> None:
    """AIS moves ``path.beta`` between runs: compiled chains must follow it (a block that
    baked the first temperature in would give another log Z)."""
    from ebmflow.metrics import ais_log_partition

    torch._dynamo.reset()
    target = _mixture()
    base = GaussianMixtureEnergy(torch.zeros(1, 2), torch.full((1, 2), 2.0))
    out = []
    for compiled in (False, True):
        s = MALA(0.2, compile=compiled)
        s.compile_backend = "eager"
        log_z, _ = ais_log_partition(target, base, s, n_particles=256, n_temps=12,
                                     mcmc_steps=10, generator=torch.Generator().manual_seed(0))
        out.append(float(log_z))
    assert abs(out[0] - out[1]) < 1e-5, out
    assert abs(out[0]) < 0.1  # the mixture is normalised: log Z = 0


class _StrideRecorder(MLPEnergy):
    """An MLP energy that records the strides of the states its compiled blocks hand it."""

    def __init__(self, d: int) -> None:
        torch.manual_seed(0)
        super().__init__(Continuous(d), hidden=(8,))
        self.seen: list = []

    def energy_and_grad(self, x: torch.Tensor):
        if torch.compiler.is_compiling():
            self.seen.append(tuple(x.stride()))
        return super().energy_and_grad(x)


def _block_input_strides(d: int) -> set:
    """Strides of the states a compiled MALA block evaluates the energy at."""
    energy = _StrideRecorder(d)
    sampler = MALA(0.05, compile=True)
    sampler.compile_backend = "eager"
    x0 = torch.randn(32, d, generator=torch.Generator().manual_seed(1))
    out = sampler.run(energy, x0, 17, generator=torch.Generator().manual_seed(0))
    assert out.is_contiguous(), "the compiled executor must hand back a row-major state"
    assert energy.seen, "no compiled block ran"
    return set(energy.seen)


@pytest.mark.parametrize("d", [2, INNERMOST_MAX])
def test_small_states_run_chains_innermost(d) -> None:
    """A (B, D) state with D <= INNERMOST_MAX enters the block with strides (1, B)."""
    torch._dynamo.reset()
    assert _block_input_strides(d) == {(1, 32)}


def test_larger_states_stay_row_major() -> None:
    torch._dynamo.reset()
    d = INNERMOST_MAX + 1
    assert _block_input_strides(d) == {(d, 1)}
    energy = _StrideRecorder(d)
    s = MALA(0.05, compile=True)
    s.compile_backend = "eager"
    s.run(energy, torch.randn(32, d), 17, generator=torch.Generator().manual_seed(0))
    assert [key[4] for key in s._compiled] == [False]  # no chains-innermost block at all


def test_chains_innermost_layout_rule() -> None:
    b = 16
    flat = {"x": torch.randn(b, 3), "wide": torch.randn(b, INNERMOST_MAX + 1),
            "one": torch.randn(b, 1), "rows": torch.randn(b), "other": torch.randn(5, 3),
            "square": torch.randn(2, 2), "cube": torch.randn(b, 2, 2)}
    out = chains_innermost(flat, b)
    assert out["x"].stride() == (1, b)
    for name in ("wide", "one", "rows", "other", "cube"):
        assert out[name].stride() == flat[name].stride(), name
    assert chains_innermost({"x": flat["square"]}, 2)["x"].stride() == (2, 1)  # D == B
    back = chains_outermost(out)
    for name, v in flat.items():
        assert torch.equal(out[name], v) and torch.equal(back[name], v)
        assert back[name].is_contiguous()


@pytest.mark.parametrize("innermost", [False, True])
def test_mixture_chains_last_gradient_keeps_the_layout_of_x(innermost) -> None:
    target = _mixture()
    x = torch.randn(24, 2, generator=torch.Generator().manual_seed(2))
    if innermost:
        x = chains_innermost({"x": x}, 24)["x"]
    e, g = target._energy_and_grad_chains_last(x)
    assert g.stride() == x.stride()
    e_ref, g_ref = EnergyModel.energy_and_grad(target, x.contiguous())
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-5)


def test_mixture_chains_last_gradient_equals_autograd() -> None:
    """The compiled-path closed form of the mixture (chains innermost) is the same function."""
    from ebmflow.energy.base import EnergyModel as Base

    target = GaussianMixtureEnergy(torch.randn(5, 3), torch.rand(5, 3) + 0.3,
                                   torch.rand(5) + 0.1)
    x = torch.randn(40, 3) * 3
    e, g = target._energy_and_grad_chains_last(x)
    e_ref, g_ref = Base.energy_and_grad(target, x)
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_nonfinite_x0_is_bad_input_naming_x0() -> None:
    energy = _mixture()
    x0 = torch.zeros(6, 2)
    x0[2, 1] = math.nan
    x0[4, 0] = math.inf
    for s in (Langevin(0.01), MALA(0.1), Langevin(0.01, on_nonfinite="reset")):
        with pytest.raises(ValueError, match=r"x0 holds NaN/inf values in 2 chain\(s\) \(\[2, 4\]"):
            s.run(energy, x0, 3)
    # finite x0 with a NaN energy stays a sampler-side report (NonFiniteError)


def test_wrong_space_error_lists_the_samplers_that_can() -> None:
    with pytest.raises(ValueError, match="samplers for this space: Langevin, MALA, HMC"):
        Gibbs().sample(_mixture(), 4)
    with pytest.raises(ValueError, match="Gibbs, GibbsWithGradients, DiscreteLangevin"):
        MALA().sample(_binary_mlp(), 4)


@pytest.mark.slow  # inductor
def test_inductor_compiles_the_fast_gemm_path_without_fallback() -> None:
    """A wide float32 MLP takes the oneDNN GEMM path; inside inductor it must stay compiled
    (an opaque operator), not fall back to eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=(256, 256))
    x0 = torch.randn(256, 2)
    out = []
    for compiled in (False, True):
        s = MALA(0.01, compile=compiled)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileFallbackWarning)
            out.append(s.run(energy, x0, 20, generator=torch.Generator().manual_seed(0)))
    assert s.compile_seconds is not None
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-4)


def test_short_runs_compile_once() -> None:
    """The block size never depends on a run's length: runs of 5, 7, 9, 12 and 20 steps share
    one compiled block (runs shorter than a block stay eager)."""
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    energy = _mixture()
    s = MALA(0.1, compile=True)
    s.compile_backend = counting
    for n in (5, 7, 9, 12, 20, 5):
        s.run(energy, _x0(energy), n, generator=torch.Generator().manual_seed(0))
    assert len(graphs) == 1


def test_fallback_warning_points_at_the_callers_line() -> None:
    energy = _mixture()
    with pytest.warns(CompileFallbackWarning) as record:
        TorchRandnWalk(compile=True).run(energy, _x0(energy), 5)
    assert record[0].filename == __file__


def test_later_runs_reuse_the_block_and_start_compiled():
    """The first run records step 0 eagerly, then runs K-step blocks; a later run of the same
    layout starts compiled at step 0 in the same block; the chains equal eager ones."""
    energy, x0 = _mixture(), _x0(_mixture())
    sampler = MALA(0.2, compile=True, graph_steps=4)
    eager = MALA(0.2, compile=False)
    gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        out1 = sampler.run(energy, x0, 8, generator=gen)
        (block,) = sampler._compiled.values()
        assert block.calls == 1  # step 0 eager, one block of 4, 3 steps eager
        out2 = sampler.run(energy, x0, 8, generator=gen)
    assert list(sampler._compiled.values()) == [block] and block.calls == 3  # 2 blocks more
    torch.testing.assert_close(out1, eager.run(energy, x0, 8, generator=ref_gen))
    torch.testing.assert_close(out2, eager.run(energy, x0, 8, generator=ref_gen))


def test_compile_auto_counts_steps_from_zero():
    """compile="auto" compiles a run once ``compile_after`` steps have been run in total,
    this run's included: 9 of 10 stay eager, the run reaching 10 compiles."""
    energy, x0 = _mixture(), _x0(_mixture())
    sampler = MALA(0.2, graph_steps=4)
    sampler.compile_after = 10
    sampler.run(energy, x0, 9, generator=torch.Generator().manual_seed(0))
    assert sampler._compiled == {} and sampler._draw_specs == {}
    fresh = MALA(0.2, graph_steps=4)
    fresh.compile_after = 10
    fresh.run(energy, x0, 10, generator=torch.Generator().manual_seed(0))
    assert len(fresh._draw_specs) == 1 and len(fresh._compiled) == 1


def test_draws_are_recorded_per_chain_layout():
    """Runs on 32 and then 16 chains each record their own draws: both equal eager runs."""
    energy = _mixture()
    sampler = MALA(0.2, compile=True, graph_steps=4)
    for n in (32, 16):
        x0 = _x0(energy, n)
        out = sampler.run(energy, x0, 9, generator=torch.Generator().manual_seed(n))
        ref = MALA(0.2, compile=False).run(energy, x0, 9,
                                            generator=torch.Generator().manual_seed(n))
        torch.testing.assert_close(out, ref)
    assert len(sampler._draw_specs) == 2


def test_unavailable_compiler_warns_once_and_runs_eagerly(monkeypatch):
    from ebmflow.samplers import _compiled, executors

    monkeypatch.setattr(executors, "compile_available", lambda: (False, "no compiler here"))
    energy, x0 = _mixture(), _x0(_mixture())
    sampler = MALA(0.2, compile=True, graph_steps=4)
    with pytest.warns(CompileFallbackWarning,
                      match=r"^MALA: compiled chains are not available \(no compiler here\); "
                            r"running eagerly\. Pass compile=False to silence this warning\.$"):
        out = sampler.run(energy, x0, 9, generator=torch.Generator().manual_seed(1))
    assert sampler._compile_failed == "no compiler here" and sampler._compiled == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        sampler.run(energy, x0, 9, generator=torch.Generator().manual_seed(1))  # warned once
    ref = MALA(0.2, compile=False).run(energy, x0, 9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, ref)
    assert _compiled.compile_available()[0]


def test_a_block_failing_after_its_first_call_raises(monkeypatch):
    """Only a first call may fall back: a later failure is an error of the chains."""
    calls = []

    def flaky_compile(fn=None, **kwargs):
        def run(*args, **kw):
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("second call failed")
            return fn(*args, **kw)

        return run

    monkeypatch.setattr(torch, "compile", flaky_compile)
    energy, x0 = _mixture(), _x0(_mixture())
    with pytest.raises(RuntimeError, match="second call failed"):
        MALA(0.2, compile=True, graph_steps=4).run(energy, x0, 9,
                                                  generator=torch.Generator().manual_seed(0))


def test_a_step_drawing_with_torch_falls_back_with_the_samplers_name():
    with pytest.warns(CompileFallbackWarning,
                      match=r"^TorchRandnWalk: compiled chains are not available \(TorchRandnWalk\."
                            r"step draws random numbers without ebmflow\.samplers\.rng "):
        TorchRandnWalk(compile=True).run(_mixture(), _x0(_mixture()), 9,
                                         generator=torch.Generator().manual_seed(0))


class _CountingBar:
    updates: list[int] = []

    def __init__(self, total=None, **kwargs):
        self.total = total

    def update(self, n=1):
        _CountingBar.updates.append(n)

    def close(self):
        pass


@pytest.mark.parametrize("compile_", [True, False])
def test_progress_bar_counts_every_step(monkeypatch, compile_):
    """The bar advances by exactly the steps run: the eager first step, K per block and the
    eager remainder (and one per step without compiling)."""
    import ebmflow.samplers.base as sampler_base

    monkeypatch.setattr(sampler_base, "tqdm", _CountingBar)
    _CountingBar.updates = []
    energy, x0 = _mixture(), _x0(_mixture())
    sampler = MALA(0.2, compile=compile_, graph_steps=4)
    sampler.run(energy, x0, 11, generator=torch.Generator().manual_seed(0), progress=True)
    assert sum(_CountingBar.updates) == 11
    if compile_:
        assert _CountingBar.updates.count(4) == 2  # (11 - 1) // 4 blocks


@pytest.mark.parametrize("seeded", [True, False])
def test_a_block_that_fails_to_compile_falls_back_to_the_eager_chains(monkeypatch, seeded):
    """A compile failure at the first call: the warning names the sampler and the error, no
    block is kept, and the run ends eagerly with the chains of an eager run (the failed
    block's noise goes back to the generator, a given one or the default one)."""

    def broken(*args, **kwargs):
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: broken)
    energy, x0 = _mixture(), _x0(_mixture())
    sampler = MALA(0.2, compile=True, graph_steps=4)
    torch.manual_seed(11)
    with pytest.warns(CompileFallbackWarning,
                      match=r"^MALA: compiled chains are not available \(torch\.compile failed: "
                            r"RuntimeError: backend exploded\); running eagerly\. Pass "
                            r"compile=False to silence this warning\.$"):
        out = sampler.run(energy, x0, 9,
                          generator=torch.Generator().manual_seed(5) if seeded else None)
    assert sampler._compiled == {}
    assert sampler._compile_failed == "torch.compile failed: RuntimeError: backend exploded"
    torch.manual_seed(11)
    ref = MALA(0.2, compile=False).run(
        energy, x0, 9, generator=torch.Generator().manual_seed(5) if seeded else None)
    torch.testing.assert_close(out, ref)


def test_compiled_block_bookkeeping_and_compile_arguments(monkeypatch):
    """What a block records (K, its draws, its key, calls, the first call's seconds) and
    how torch.compile is asked: static shapes, the sampler's backend."""
    calls = []
    real_compile = torch.compile

    def recording_compile(fn=None, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    energy, x0 = _mixture(), _x0(_mixture())
    sampler = MALA(0.2, compile=True, graph_steps=4)
    sampler.compile_backend = "eager"
    t0 = time.perf_counter()
    sampler.run(energy, x0, 9, generator=torch.Generator().manual_seed(0))
    elapsed = time.perf_counter() - t0
    assert calls == [{"dynamic": False, "backend": "eager", "options": None}]
    ((key, block),) = sampler._compiled.items()
    assert block.key is key and block.k == 4 and block.calls == 2
    # MALA: one normal draw per step (proposal noise and the log-uniform), 32 x (2 + 2)
    # numbers: a multiple of 16, so a block's K steps are drawn with one call
    assert [(d.kind, d.shape) for d in block.spec] == [("randn", (128,))]
    assert block.whole_draws is True
    assert isinstance(block.compile_seconds, float) and 0 < block.compile_seconds < elapsed
    assert sampler.compile_seconds == block.compile_seconds
    fresh = MALA(0.2, compile=True)
    assert fresh.compile_seconds is None and fresh.compile_backend == "inductor"
    # with inductor on the CPU, the block skips inductor's runtime size asserts (dynamo's
    # guards hold) and has inductor write its wrapper in C++; elsewhere inductor's defaults
    calls.clear()
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: calls.append(kw) or fn)
    block = CompiledBlock(lambda e, flat, tape: flat, 2, [], ("key",), backend="inductor")
    assert calls == []  # built at the first call, when the device is known
    flat = {"x": torch.zeros(3, 2)}
    assert block(None, flat, []) is flat and block(None, flat, []) is flat
    # a small state (6 numbers) also pools the block's intermediate buffers
    assert calls == [{"dynamic": False, "backend": "inductor",
                      "options": {"size_asserts": False, "cpp_wrapper": True,
                                  "memory_planning": True}}]
    calls.clear()
    big = CompiledBlock(lambda e, flat, tape: flat, 2, [], ("key",), backend="inductor")
    # the state decides, not the first tensor of the carry
    flat = {"t": torch.zeros(()), "x": torch.zeros(POOLED_STATE_MAX + 1)}
    assert big(None, flat, []) is flat
    assert calls == [{"dynamic": False, "backend": "inductor",
                      "options": {"size_asserts": False, "cpp_wrapper": True}}]
    cpu = torch.device("cpu")
    assert inductor_options("inductor", cpu, POOLED_STATE_MAX)["memory_planning"] is True
    assert "memory_planning" not in inductor_options("inductor", cpu, POOLED_STATE_MAX + 1)
    assert "memory_planning" not in inductor_options("inductor", cpu)
    assert inductor_options("inductor", torch.device("cuda"), 6) == {}
    assert inductor_options("inductor", torch.device("cuda")) == {}
    assert inductor_options("inductor", torch.device("meta")) == {}
    assert inductor_options("aot_eager", torch.device("cpu")) is None


def test_at_most_four_blocks_are_kept_oldest_first_out():
    """One block per energy (a live and an EMA energy, say): the fifth evicts the first."""
    sampler = Langevin(0.05, compile=True, graph_steps=2)
    energies = [GaussianMixtureEnergy(torch.randn(2, 2, generator=torch.Generator().manual_seed(i)))
                for i in range(5)]
    x0 = torch.zeros(8, 2)
    keys = []
    for e in energies:
        sampler.run(e, x0, 5, generator=torch.Generator().manual_seed(0))
        keys.append(next(k for k in sampler._compiled if k[0] == id(e)))
    assert list(sampler._compiled) == keys[1:]
    assert all(block is not None and block.calls == 2 for block in sampler._compiled.values())


def test_compile_available_and_its_reasons(monkeypatch):
    from ebmflow.samplers import _compiled

    assert _compiled.compile_available() == (True, "")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert _compiled.compile_available() == (
        False, "torch._dynamo is missing from this torch build")
    monkeypatch.delattr(torch, "compile")
    assert _compiled.compile_available() == (False, "this torch has no torch.compile")


def test_whole_block_fill_boundaries():
    """Exact for one CPU draw and K >= 2 (also in float64); not for K = 1 or two draws."""
    d = rng.Draw("rand", (16, 2), torch.float64, torch.device("cpu"))
    n = rng.Draw("randn", (16, 2), torch.float32, torch.device("cpu"))
    assert whole_block_fill_is_exact([d], 2) and whole_block_fill_is_exact([d], 5)
    assert whole_block_fill_is_exact([n], 2)
    assert not whole_block_fill_is_exact([d], 1)
    assert not whole_block_fill_is_exact([d, n], 4)


def test_predraw_allocates_on_the_draws_device_and_randint_keeps_its_low_bound():
    spec = [rng.Draw("randn", (3,), torch.float32, torch.device("meta"))]
    (out,) = predraw(spec, 2, None)
    assert out.shape == (2, 3) and out.device.type == "meta"
    d = rng.Draw("randint", (4000,), torch.long, torch.device("cpu"), low=3, high=5)
    v = d.fill(torch.empty(4000, dtype=torch.long), torch.Generator().manual_seed(0))
    assert set(v.unique().tolist()) == {3, 4}


def test_noise_tape_hands_out_draws_in_order_then_refuses():
    a, b = torch.zeros(1), torch.ones(1)
    tape = rng.NoiseTape([a, b])
    assert tape.next() is a and tape.i == 1 and tape.next() is b and tape.i == 2
    with pytest.raises(RuntimeError, match=r"^the transition drew more random tensors than "
                       r"its first step did; a compiled block needs the same draws every step$"):
        tape.next()


def test_carry_spec_names_the_device():
    from ebmflow.samplers._fast import carry_spec

    x = torch.zeros(2, 3, dtype=torch.float64)
    assert carry_spec({"x": x}) == (("x", (2, 3), torch.float64, "cpu"),)


def test_stored_mask_is_float_only_inside_compiled_blocks(monkeypatch) -> None:
    from ebmflow.samplers._discrete import stored_mask

    mask = torch.tensor([[True, False], [False, True]])
    assert stored_mask(mask, torch.float32) is mask
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = stored_mask(mask, torch.float64)
    assert out.dtype == torch.float64 and torch.equal(out, mask.double())
    assert torch.equal(out.bool(), mask)


@pytest.mark.parametrize("kind,low,high", [("randn", 0, 0), ("rand", 0, 0), ("randint", 3, 9)])
def test_draw_filler_and_fill_draw_what_torch_draws(kind, low, high) -> None:
    dtype = torch.long if kind == "randint" else torch.float32
    d = rng.Draw(kind, (5, 3), dtype, torch.device("cpu"), low, high)
    g = torch.Generator().manual_seed(4)
    want = {"randn": lambda: torch.randn(5, 3, generator=g),
            "rand": lambda: torch.rand(5, 3, generator=g),
            "randint": lambda: torch.randint(low, high, (5, 3), generator=g)}[kind]()
    a, b = torch.empty(5, 3, dtype=dtype), torch.empty(5, 3, dtype=dtype)
    d.fill(a, torch.Generator().manual_seed(4))
    d.filler(b)(generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, want) and torch.equal(b, want)


def test_noise_block_is_kept_with_the_compiled_block_and_refilled_in_place() -> None:
    torch._dynamo.reset()
    energy = _mixture()
    s = MALA(0.2, compile=True)
    s.compile_backend = "eager"
    g = torch.Generator().manual_seed(1)
    s.run(energy, _x0(energy), 17, generator=g)
    (block,) = s._compiled.values()
    noise = block.noise
    assert noise is not None
    buffers = [t.data_ptr() for t in noise.buffers]
    before = [t.clone() for t in noise.buffers]
    s.run(energy, _x0(energy), 17, generator=g)
    assert block.noise is noise and [t.data_ptr() for t in noise.buffers] == buffers
    assert not all(torch.equal(a, b) for a, b in zip(before, noise.buffers))  # new numbers
    # a refill draws what predraw draws from the same generator state
    spec = block.spec
    want = predraw(spec, block.k, torch.Generator().manual_seed(5))
    got = noise.refill(torch.Generator().manual_seed(5))
    for w, t in zip(want, got):
        assert torch.equal(w, t)


class FlatViewEnergy(EnergyModel):
    """A user energy that flattens the state with ``view`` (needs row-major memory)."""

    def __init__(self) -> None:
        super().__init__(Continuous(2))

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1)
        return 0.5 * flat.square().view(x.shape[0], 2).sum(1)


def test_an_energy_that_needs_row_major_states_compiles_row_major_without_warning(monkeypatch) -> None:
    torch._dynamo.reset()
    energy = FlatViewEnergy()
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    out = {}
    for compiled in (False, True):
        s = MALA(0.1, compile=compiled)
        s.compile_backend = "aot_eager"
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileFallbackWarning)
            out[compiled] = s.run(energy, x0, 17, generator=torch.Generator().manual_seed(0))
    assert s._row_major_blocks and s._compile_failed is None and s.compile_seconds is not None
    (key,) = s._compiled
    assert key[4] is False  # the block kept is the row-major one
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
    # later runs go straight to the row-major block: no second chains-innermost attempt
    tried = []
    real_run_blocks = executors._run_blocks
    monkeypatch.setattr(executors, "_run_blocks",
                        lambda *args: tried.append(args[-1]) or real_run_blocks(*args))
    s.run(energy, x0, 17, generator=torch.Generator().manual_seed(0))
    assert tried == [False] and len(s._compiled) == 1


def test_each_compiled_step_hands_on_the_chains_innermost_layout() -> None:
    """The block's outputs (state, the MLP's row-major gradient) come back chains innermost,
    so the next call sees the strides it was compiled for."""
    torch._dynamo.reset()
    energy = _StrideRecorder(2)
    s = MALA(0.05, compile=True)
    s.compile_backend = "eager"
    g = torch.Generator().manual_seed(0)
    s.run(energy, torch.randn(32, 2, generator=torch.Generator().manual_seed(1)), 17, generator=g)
    (key,) = s._compiled
    block = s._compiled[key]
    assert key[4] is True
    state = s.init_state(energy, torch.randn(32, 2, generator=torch.Generator().manual_seed(2)))
    from ebmflow.samplers._fast import flatten_carry
    from ebmflow.samplers.chain import _Carry

    carry = _Carry(state, {n: torch.zeros(32) for n in ("accept_rate", "nonfinite_rate")},
                   torch.zeros(32, dtype=torch.long), torch.zeros((), dtype=torch.long),
                   torch.zeros((), dtype=torch.long))
    flat = chains_innermost(flatten_carry(carry), 32)
    out = block(energy, flat, block.noise.refill(g))
    for name in ("x", "grad"):
        assert out[name].shape == (32, 2) and out[name].stride() == (1, 32), name


def test_noise_block_fills_like_the_eager_steps_in_every_mode() -> None:
    """Step-by-step fills (two draws per step, reused buffers) and the one-call fill of a single
    draw give exactly the draws K eager steps make; integer draws keep their dtype."""
    from ebmflow.samplers._compiled import NoiseBlock

    cpu = torch.device("cpu")
    two = [rng.Draw("randint", (6, 1), torch.long, cpu, 2, 7), rng.Draw("rand", (6,), torch.float32, cpu)]
    g = torch.Generator().manual_seed(3)
    want_i, want_u = [], []
    for _ in range(4):
        want_i.append(torch.randint(2, 7, (6, 1), generator=g))
        want_u.append(torch.rand(6, generator=g))
    bufs = [torch.empty(4, 6, 1, dtype=torch.long), torch.empty(4, 6)]
    got = predraw(two, 4, torch.Generator().manual_seed(3), out=bufs)
    assert got[0] is bufs[0] and got[0].dtype == torch.long
    assert torch.equal(got[0], torch.stack(want_i)) and torch.equal(got[1], torch.stack(want_u))
    block = NoiseBlock(two, 4)
    assert block.buffers[0].dtype == torch.long and block.buffers[1].dtype == torch.float32
    again = block.refill(torch.Generator().manual_seed(3))
    assert torch.equal(again[0], torch.stack(want_i)) and torch.equal(again[1], torch.stack(want_u))
    one = [rng.Draw("randn", (8, 2), torch.float32, cpu)]
    assert whole_block_fill_is_exact(one, 4)
    whole = NoiseBlock(one, 4, whole=True).refill(torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(whole[0], torch.stack([torch.randn(8, 2, generator=g) for _ in range(4)]))


def _auto_runs(sampler, energy, lengths, monkeypatch=None, delay=0.0):
    """Runs of the given lengths from one start, one generator; returns the states."""
    if delay:
        real_call = CompiledBlock.__call__

        def slow_call(self, *args):
            time.sleep(delay)
            return real_call(self, *args)

        monkeypatch.setattr(CompiledBlock, "__call__", slow_call)
    g = torch.Generator().manual_seed(3)
    x = _x0(energy)
    out = []
    for n in lengths:
        x = sampler.run(energy, x, n, generator=g)
        out.append(x)
    return out


def test_auto_goes_back_to_eager_where_compiled_discrete_steps_are_slower(monkeypatch):
    """compile="auto" on a discrete state times the compiled blocks (after the compiling
    call) against the last eager run; slower by more than 10% over 4 or more calls, the
    layout runs eagerly from then on. The chains are the eager chains throughout."""
    energy = _binary_mlp()
    lengths = [10, 40, 40, 40, 40]
    eager = _auto_runs(GibbsWithGradients(compile=False), energy, lengths)
    s = GibbsWithGradients()  # compile="auto"
    s.compile_after, s.compile_backend = 20, "eager"
    calls = []
    real_run_compiled = base_module.run_compiled
    monkeypatch.setattr(base_module, "run_compiled",
                        lambda *a: calls.append(1) or real_run_compiled(*a))
    got = _auto_runs(s, energy, lengths, monkeypatch, delay=0.05)
    for a, b in zip(got, eager):
        assert torch.equal(a, b)
    # run 1 eager; runs 2-3 compiled (3 + 5 timed block calls); then eager for good
    assert len(calls) == 2
    assert s._auto_slower == {executors.auto_layout(energy, got[0])}
    assert s._last_block.timed_calls == 8 and s._last_block.calls == 9


def test_auto_keeps_compiled_continuous_chains_and_compile_true(monkeypatch):
    """Continuous chains agree with eager only to float rounding, so "auto" never switches
    them on timing; compile=True never switches either."""
    energy = _mixture()
    s = MALA(0.2)
    s.compile_after, s.compile_backend = 20, "eager"
    t0 = time.perf_counter()
    _auto_runs(s, energy, [10, 40, 40, 40], monkeypatch, delay=0.02)
    elapsed = time.perf_counter() - t0
    assert s._auto_slower == set() and s._last_block is not None
    assert s._last_block.timed_calls == 13  # 3 + 5 + 5: compiled to the end
    # the timed calls' wall time is summed: at least their delays, at most the whole runs
    assert 13 * 0.02 <= s._last_block.timed_seconds <= elapsed
    forced = GibbsWithGradients(compile=True)
    forced.compile_backend = "eager"
    _auto_runs(forced, _binary_mlp(), [10, 40, 40, 40], monkeypatch, delay=0.02)
    assert forced._auto_slower == set() and forced._last_block.timed_calls == 15


def test_auto_decision_needs_enough_timed_calls_and_a_clear_difference():
    s = GibbsWithGradients()
    layout = ("e", (4, 2), torch.float32)
    block = CompiledBlock(lambda e, flat, tape: flat, 8, [], ("key",), backend="eager")
    s._last_block = block
    assert not executors.auto_measured_slower(s, layout)  # no eager time yet
    s._auto_eager_seconds[layout] = 1e-3  # 1 ms per eager step
    block.timed_calls, block.timed_seconds = 3, 3 * 8 * 5e-3
    assert not executors.auto_measured_slower(s, layout)  # only 3 timed calls
    block.timed_calls, block.timed_seconds = 4, 4 * 8 * 1.09e-3
    assert not executors.auto_measured_slower(s, layout)  # within 10%
    block.timed_seconds = 4 * 8 * 1.11e-3
    assert executors.auto_measured_slower(s, layout)
    s._last_block = None
    assert not executors.auto_measured_slower(s, layout)
    s._last_block, s._auto_slower = block, {layout}
    pickled = copy.deepcopy(s)  # the timing caches are left out (keyed by id(energy))
    assert pickled._auto_eager_seconds == {} and pickled._last_block is None
    assert pickled._auto_slower == set()
    fresh = CompiledBlock(lambda e, flat, tape: flat, 8, [], ("key",), backend="eager")
    assert fresh.timed_calls == 0 and fresh.timed_seconds == 0.0
    # each energy has its own comparison, also for states of one shape and dtype
    x, one, other = torch.zeros(4, 2), _binary_mlp(), _binary_mlp()
    assert executors.auto_layout(one, x) != executors.auto_layout(other, x)
    assert executors.auto_layout(one, x) == executors.auto_layout(one, x.clone())


def test_docs_state_the_pooled_state_limit():
    """The design notes and the compiled-chains page quote the limit the code uses."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "docs").is_dir():  # a copy of the tests without the docs (mutation runs)
        pytest.skip("no docs/ beside tests/")
    assert f"`_compiled.POOLED_STATE_MAX` ({POOLED_STATE_MAX})" in (root / "docs" / "design.md").read_text()
    compiled = " ".join((root / "docs" / "compiled.md").read_text().split())
    assert f"at most {POOLED_STATE_MAX} numbers in all (`_compiled.POOLED_STATE_MAX`" in compiled
