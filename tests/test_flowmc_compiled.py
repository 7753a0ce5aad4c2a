"""Compiled FlowMC rounds: the same chains as eager rounds, no recompilation when only values
change, a fallback warning for flows that cannot be compiled.

Most tests compile with the ``eager`` backend (dynamo traces the chunks exactly as for
inductor, without generating C++); the slow test runs inductor itself.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from ebmflow.energy import GaussianMixtureEnergy, MLPEnergy
from ebmflow.flows import ContinuousFlow, FlowMC, RealNVP, ZukoFlow
from ebmflow.samplers import MALA, CompileFallbackWarning, Langevin, rng
from ebmflow.spaces import Continuous


def _target() -> GaussianMixtureEnergy:
    return GaussianMixtureEnergy(
        torch.tensor([[-2.0, 0.0], [2.0, 0.5]]), torch.tensor([0.8, 0.9]), torch.tensor([0.6, 0.4])
    )


def _realnvp(seed: int = 0) -> RealNVP:
    torch.manual_seed(seed)
    flow = RealNVP(2, n_layers=2, hidden=(8,), scale=torch.tensor([2.5, 1.2]))
    with torch.no_grad():  # not the identity: acceptances vary between chains
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow


def _zuko(seed: int = 0) -> ZukoFlow:
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(seed)
    return ZukoFlow(zuko.flows.MAF(2, transforms=2, hidden_features=(8,)))


def _x0(n: int = 32) -> Tensor:
    return 2.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(2))


def _run(flow, compiled, *, local=None, backend="eager", rounds=3, **kw):
    s = FlowMC(flow, local if local is not None else MALA(0.1), flow_steps=0,
               compile=compiled, **kw)
    s.compile_backend = backend
    g = torch.Generator().manual_seed(1)
    x = s.sample(_target(), x0=_x0(), generator=g, n_rounds=rounds)
    return s, x, g


CASES = [
    # n_global=5, B=32, 64 proposals per flow call: chunks of 2, 2, 1 moves (k > 1 and k = 1)
    ("realnvp-mala-chunks", _realnvp, dict(n_local=4, n_global=5, proposal_batch_size=64)),
    # n_local=0: E(x) is not cached by a local kernel, the first chunk computes it
    ("realnvp-global-only", _realnvp, dict(n_local=0, n_global=6, proposal_batch_size=None)),
    ("realnvp-langevin", _realnvp,
     dict(local=Langevin(0.02), n_local=3, n_global=4, proposal_batch_size=None)),
    ("zuko-maf", _zuko, dict(n_local=2, n_global=4, proposal_batch_size=64)),
]


@pytest.mark.parametrize("name,make_flow,kw", CASES, ids=[c[0] for c in CASES])
def test_compiled_rounds_equal_eager_rounds(name, make_flow, kw) -> None:
    """Same generator, same chains, same per-chain acceptance, same generator state after."""
    torch._dynamo.reset()
    flow = make_flow()
    local = kw.pop("local", None)
    s_e, x_e, g_e = _run(flow, False, local=local, **kw)
    local_c = None if local is None else type(local)(local.step_size)
    s_c, x_c, g_c = _run(flow, True, local=local_c, **kw)
    assert s_c.compile_seconds is not None, "no compiled chunk ran"
    assert len(s_c._blocks) >= 1
    torch.testing.assert_close(x_c, x_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_c.chain_stats["global_accept"],
                               s_e.chain_stats["global_accept"], rtol=0, atol=1e-6)
    for key in ("local_accept", "global_accept", "flow_nonfinite"):
        torch.testing.assert_close(s_c.stats[key], s_e.stats[key], rtol=1e-5, atol=1e-6)
    assert 0.05 < float(s_e.stats["global_accept"]) < 0.95  # accepts and rejects happen
    # the compiled rounds drew exactly what the eager rounds drew, in the same order
    assert torch.equal(g_c.get_state(), g_e.get_state())


def test_local_kernel_gets_the_compile_option() -> None:
    s = FlowMC(_realnvp(), MALA(0.1), n_local=10, compile=True)
    assert s.local.compile is True and s.local.graph_steps == 9
    s.compile_backend = "eager"
    assert s.local.compile_backend == "eager"
    own = MALA(0.1, compile=False)
    assert FlowMC(_realnvp(), own, compile=True).local.compile is False  # not overridden
    assert FlowMC(_realnvp(), MALA(0.1)).local.compile == "auto"  # the kernel's default


def test_no_recompilation_across_rounds_when_only_values_change() -> None:
    """Rounds with new chain values, a flow being fitted between rounds and an energy whose
    parameters change reuse the compiled chunks: no new graph after the first round."""
    torch._dynamo.reset()
    graphs: list = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=(8,)) + _target()
    s = FlowMC(_realnvp(), MALA(0.05), n_local=4, n_global=5, proposal_batch_size=64,
               compile=True, lr=1e-2)
    s.compile_backend = counting
    g = torch.Generator().manual_seed(0)
    s.sample(energy, x0=_x0(), generator=g)
    first = len(graphs)
    assert first >= 2  # the local block and the global chunks
    before = [p.detach().clone() for p in s.flow.parameters()]
    for i in range(4):
        s.update(energy, generator=g)  # the flow's parameter values change
        with torch.no_grad():
            for p in energy.parameters():
                p.mul_(1.01)
        s.sample(energy, generator=g, n_rounds=2 if i % 2 else 1)
    assert not all(torch.equal(a, b) for a, b in zip(before, s.flow.parameters()))
    assert len(graphs) == first, f"{len(graphs) - first} recompilations"


class TorchRandnFlow(RealNVP):
    """A user flow drawing its base noise with torch.randn directly (no pre-drawn noise)."""

    def sample_and_log_prob(self, n, generator=None):
        z = torch.randn((n, self.dim), generator=generator)
        x, logdet = self(z)
        return x, self.base_log_prob(z) - logdet


def test_uncompilable_user_flow_falls_back_with_a_warning() -> None:
    kw = dict(n_local=2, n_global=4, proposal_batch_size=None)
    flow = TorchRandnFlow(2, n_layers=2, hidden=(8,))
    _, x_e, _ = _run(flow, False, **kw)
    with pytest.warns(CompileFallbackWarning, match="ebmflow.samplers.rng"):
        s, x_c, _ = _run(flow, True, **kw)
    torch.testing.assert_close(x_c, x_e, rtol=1e-5, atol=1e-5)  # eager, same stream
    assert not s._blocks
    with warnings.catch_warnings():  # said once, then eager without a word
        warnings.filterwarnings("error", category=CompileFallbackWarning)
        s.sample(_target(), generator=torch.Generator().manual_seed(3))


def test_a_failing_compile_falls_back_to_the_same_moves() -> None:
    """A backend error at the first chunk: warned, and the round finishes eagerly from the
    noise already drawn, so the chains are still the eager chains."""
    torch._dynamo.reset()

    def failing(gm, example_inputs):
        raise RuntimeError("no code generation here")

    kw = dict(n_local=0, n_global=5, proposal_batch_size=64)
    _, x_e, g_e = _run(_realnvp(), False, **kw)
    with pytest.warns(CompileFallbackWarning, match="torch.compile failed"):
        s, x_c, g_c = _run(_realnvp(), True, backend=failing, **kw)
    torch.testing.assert_close(x_c, x_e, rtol=1e-5, atol=1e-5)
    assert torch.equal(g_c.get_state(), g_e.get_state())
    assert s._compile_failed is not None and not s._blocks


def test_ode_flow_is_not_compiled() -> None:
    flow = ContinuousFlow(2, trace="exact", ode_steps=4)
    s = FlowMC(flow, MALA(0.1), n_local=0, n_global=2, flow_steps=0, compile=True,
               logq_tol=1.0)
    s.compile_backend = "eager"
    with pytest.warns(CompileFallbackWarning, match="ODE"):
        s.sample(_target(), x0=_x0(8), generator=torch.Generator().manual_seed(0))


def test_compile_auto_waits_for_enough_moves() -> None:
    torch._dynamo.reset()
    s = FlowMC(_realnvp(), MALA(0.1), n_local=0, n_global=5, flow_steps=0, compile="auto")
    s.compile_backend = "eager"
    s.compile_after = 12
    g = torch.Generator().manual_seed(0)
    s.sample(_target(), x0=_x0(), generator=g, n_rounds=2)  # 10 moves: eager
    assert s.compile_seconds is None
    s.sample(_target(), generator=g)  # 15 >= 12: compiled from now on
    assert s.compile_seconds is not None


def test_compile_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
        FlowMC(_realnvp(), compile="always")


@pytest.mark.parametrize("make_flow", [_realnvp, _zuko], ids=["realnvp", "zuko"])
def test_base_noise_can_be_pre_drawn(make_flow) -> None:
    """sample_and_log_prob(n, generator) = sample_from_base(base_sample(n, generator)) =
    sample_and_log_prob(n, tape of the same noise)."""
    flow = make_flow()
    with torch.no_grad():
        x, lq = flow.sample_and_log_prob(16, torch.Generator().manual_seed(4))
        z = flow.base_sample(16, torch.Generator().manual_seed(4))
        x2, lq2 = flow.sample_from_base(z)
        x3, lq3 = flow.sample_and_log_prob(16, rng.NoiseTape([z]))
    for a, b in ((x, x2), (lq, lq2), (x, x3), (lq, lq3)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(flow.log_prob(x), lq, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # inductor generates C++: tens of seconds on a small CPU
def test_inductor_rounds_equal_eager_rounds() -> None:
    torch._dynamo.reset()
    kw = dict(n_local=4, n_global=4, proposal_batch_size=None)
    s_e, x_e, _ = _run(_realnvp(), False, backend="inductor", **kw)
    s_c, x_c, _ = _run(_realnvp(), True, backend="inductor", **kw)
    assert s_c.compile_seconds is not None
    # fused float arithmetic: a proposal right at the acceptance threshold may flip
    close = ((x_c - x_e).abs() < 1e-4).all(1).float().mean()
    assert float(close) > 0.95
    torch.testing.assert_close(s_c.stats["global_accept"], s_e.stats["global_accept"],
                               rtol=0, atol=0.05)


def test_python_attributes_of_the_flow_and_energy_are_followed() -> None:
    """A Python scalar read inside a chunk (a coupling's scale bound, an energy's
    temperature) is not baked in: changing it between rounds changes the compiled moves as
    it changes the eager ones."""
    torch._dynamo.reset()

    class Tempered(GaussianMixtureEnergy):
        temperature = 1.0

        def energy(self, x):
            return super().energy(x) / self.temperature

    def make():
        t = _target()
        e = Tempered(t.means, t.scales, t.weights)
        return e

    out = []
    for compiled in (False, True):
        energy, flow = make(), _realnvp()
        s = FlowMC(flow, MALA(0.1), n_local=0, n_global=4, flow_steps=0, compile=compiled,
                   proposal_batch_size=None)
        s.compile_backend = "eager"
        g = torch.Generator().manual_seed(0)
        s.sample(energy, x0=_x0(), generator=g)
        flow.layers[0].scale_bound = 0.5
        energy.temperature = 3.0
        out.append(s.sample(energy, generator=g, n_rounds=2))
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)


def test_samplers_with_compiled_blocks_pickle_without_them() -> None:
    """torch.save of a sampler (or a recipe holding one) after compiled runs: the compiled
    blocks are caches that cannot be pickled; they are left out and rebuilt on use, and the
    copy samples exactly like the original."""
    import io

    from ebmflow.discrete_flows import CTMCSolver, DiscreteFlowSampler, MixturePath, MLPVelocity

    def roundtrip(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    s = FlowMC(_realnvp(), MALA(0.1), n_local=4, n_global=4, compile=True)
    s.compile_backend = "eager"
    s.sample(_target(), x0=_x0(), generator=torch.Generator().manual_seed(0), n_rounds=2)
    assert s._blocks and s.local._compiled  # both caches are filled
    s2 = roundtrip(s)
    assert not s2._blocks and not s2.local._compiled and s._blocks  # the original keeps its own
    a = s.sample(_target(), generator=torch.Generator().manual_seed(1))
    b = s2.sample(_target(), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)

    torch.manual_seed(0)
    path = MixturePath(3, "mask")
    solver = CTMCSolver(path, dt=0.05, compile=True)
    solver.compile_backend = "eager"
    flow = DiscreteFlowSampler(MLPVelocity(6, 3, hidden=(16,), schedule=path.schedule), path,
                               solver=solver)
    flow.sample_tokens(8, generator=torch.Generator().manual_seed(2))
    assert solver._blocks
    flow2 = roundtrip(flow)
    assert not flow2.solver._blocks
    x1 = flow.sample_tokens(8, generator=torch.Generator().manual_seed(3)).x
    x2 = flow2.sample_tokens(8, generator=torch.Generator().manual_seed(3)).x
    assert torch.equal(x1, x2)
