"""The CUDA-graph executor of the chains, run on CPU through a stand-in of CUDA graph capture.

``tests/_cpu_cuda_graph.py`` records the aten operations of a capture and re-runs them on
replay into the same tensors (what a CUDA graph's fixed memory gives), so the recorder
(``GraphRunner``), its cache key (``graph_key``) and ``run_graphed`` are checked here without
a GPU: graphed chains equal the step-by-step chains for the same generator, a new recording
happens exactly when something the graph bakes in changes, and a transition that cannot be
captured falls back with a warning. The same checks on a real GPU are in
``tests/test_gpu_fixes.py`` and ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from _cpu_cuda_graph import patch_cuda_graphs

from ebmflow.energy import GaussianMixtureEnergy, IsingEnergy, MLPEnergy
from ebmflow.samplers import HMC, MALA, DiscreteLangevin, Gibbs, GibbsWithGradients, Langevin
from ebmflow.samplers._fast import GraphRunner, flatten_carry, graph_key, unflatten_carry
from ebmflow.samplers.chain import _NEVER, ChainState, _Carry
from ebmflow.samplers.executors import run_graphed
from ebmflow.spaces import Continuous


class _Bar:
    def __init__(self) -> None:
        self.n = 0

    def update(self, k: int) -> None:
        self.n += k


def _mixture() -> GaussianMixtureEnergy:
    return GaussianMixtureEnergy(
        torch.tensor([[-1.5, 0.0], [1.5, 0.5]]), torch.tensor([0.6, 0.8]), torch.tensor([0.7, 0.3])
    )


def _carry(sampler, energy, x0: torch.Tensor) -> _Carry:
    state = sampler.init_state(energy, x0.detach())
    return _Carry(state, {}, torch.full((x0.shape[0],), _NEVER, dtype=torch.long),
                  torch.zeros(()), 0)


def _stepwise(sampler, energy, x0, n, seed):
    gen = torch.Generator().manual_seed(seed)
    carry = _carry(sampler, energy, x0)
    for _ in range(n):
        carry = sampler._advance(energy, carry, gen)
    return carry, gen


def _graphed(sampler, energy, x0, n, seed, bar=None, gen=None):
    gen = torch.Generator().manual_seed(seed) if gen is None else gen.manual_seed(seed)
    carry = _carry(sampler, energy, x0)
    carry, done = run_graphed(sampler, energy, carry, n, gen, bar or _Bar())
    for _ in range(n - done):
        carry = sampler._advance(energy, carry, gen)
    return carry, gen, done


def _ising() -> IsingEnergy:
    g = torch.Generator().manual_seed(3)
    j = 0.3 * torch.randn(12, 12, generator=g)
    return IsingEnergy(j, 0.1 * torch.randn(12, generator=g))


CONTINUOUS = [
    ("langevin", lambda: Langevin(0.05, graph_steps=4)),
    ("mala", lambda: MALA(0.2, graph_steps=4)),
    ("hmc", lambda: HMC(0.2, n_leapfrog=3, graph_steps=4)),
]
DISCRETE = [
    ("gibbs", lambda: Gibbs(graph_steps=4)),
    ("gwg", lambda: GibbsWithGradients(graph_steps=4)),
    ("dmala", lambda: DiscreteLangevin(0.3, metropolis=True, graph_steps=4)),
]


@pytest.mark.parametrize("name,make", CONTINUOUS + DISCRETE, ids=[c[0] for c in CONTINUOUS + DISCRETE])
def test_graphed_chains_equal_stepwise_chains(monkeypatch, name, make):
    """10 steps as two replays of a 4-step graph plus 2 eager steps give the same states,
    cached energies, running sums, generator state and bookkeeping as 10 eager steps."""
    graphs = patch_cuda_graphs(monkeypatch)
    torch.manual_seed(0)
    if (name, make) in CONTINUOUS:
        energy, x0 = _mixture(), torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    else:
        energy = _ising()
        x0 = torch.randint(0, 2, (64, 12), generator=torch.Generator().manual_seed(1)).float()
    ref, ref_gen = _stepwise(make(), energy, x0, 10, seed=7)
    sampler = make()
    bar = _Bar()
    out, gen, done = _graphed(sampler, energy, x0, 10, seed=7, bar=bar)
    assert done == 8 and bar.n == 8
    assert len(graphs) == 1 and graphs[0].captured and graphs[0].replays == 2
    assert [r() for r in graphs[0].generators] == [gen]  # registered with the graph
    a, b = flatten_carry(ref), flatten_carry(out)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k].float(), torch.as_tensor(a[k]).float(), rtol=1e-6,
                                   atol=1e-6, msg=k)
    assert int(out.t) == 10
    assert torch.equal(gen.get_state(), ref_gen.get_state())
    assert torch.equal(out.state.x, ref.state.x)
    assert not torch.equal(out.state.x, x0)  # the chains moved


def test_the_recorded_graph_is_reused_and_rerecorded_only_when_needed(monkeypatch):
    """Same energy, shapes and settings: one recording. A new step size, a changed energy
    attribute (an annealing temperature) or new shapes: a new recording. New parameter
    values written in place: the same graph, and the chains follow the new values."""
    graphs = patch_cuda_graphs(monkeypatch)
    energy = _mixture()
    sampler = Langevin(0.05, graph_steps=4)
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator()
    _graphed(sampler, energy, x0, 8, seed=1, gen=gen)
    _graphed(sampler, energy, x0, 12, seed=2, gen=gen)
    assert len(graphs) == 1 and graphs[0].replays == 2 + 3
    first = sampler._graph
    with torch.no_grad():
        for p in energy.parameters():
            p.mul_(1.1)
    out, _, _ = _graphed(sampler, energy, x0, 8, seed=3, gen=gen)
    assert sampler._graph is first and len(graphs) == 1
    ref, _ = _stepwise(Langevin(0.05), energy, x0, 8, seed=3)
    torch.testing.assert_close(out.state.x, ref.state.x)
    sampler.step_size = 0.01
    _graphed(sampler, energy, x0, 8, seed=3, gen=gen)
    assert len(graphs) == 2
    energy.temperature_hint = 0.5  # a Python attribute the energy might read
    _graphed(sampler, energy, x0, 8, seed=3, gen=gen)
    assert len(graphs) == 3
    _graphed(sampler, energy, x0[:16], 8, seed=3, gen=gen)
    assert len(graphs) == 4
    _graphed(sampler, energy, x0[:16], 8, seed=3, gen=gen)
    assert len(graphs) == 4
    _graphed(sampler, energy, x0[:16], 8, seed=3)  # another generator: recorded for it
    assert len(graphs) == 5


def test_a_new_generator_per_run_is_honoured(monkeypatch):
    """Runs each given a fresh generator seeded alike give the same chains. (A graph keeps
    the generator it was recorded with: a new generator that reused a freed one's ``id``
    must not replay the graph bound to the old generator's state.)"""
    patch_cuda_graphs(monkeypatch)
    energy = _mixture()
    sampler = Langevin(0.05, graph_steps=4)
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    outs = [_graphed(sampler, energy, x0, 8, seed=11)[0].state.x for _ in range(3)]
    ref, _ = _stepwise(Langevin(0.05), energy, x0, 8, seed=11)
    for out in outs:
        assert torch.equal(out, ref.state.x)


def test_graph_key_names_everything_a_recording_bakes_in():
    """The key changes with the energy object, its training mode, a parameter's address,
    shapes, K, a public hyper-parameter, an energy attribute and the generator; it does not
    change with parameter values or with ``last_state``."""
    energy = MLPEnergy(Continuous(2), hidden=(8,))
    sampler = MALA(0.1)
    spec = (("x", (4, 2), torch.float32, "cpu"),)
    gen = torch.Generator()
    key = graph_key(sampler, energy, spec, 4, gen)
    assert graph_key(sampler, energy, spec, 4, gen) == key
    with torch.no_grad():
        next(energy.parameters()).add_(1.0)
    sampler.last_state = "anything"
    assert graph_key(sampler, energy, spec, 4, gen) == key
    assert graph_key(sampler, MLPEnergy(Continuous(2), hidden=(8,)), spec, 4, gen) != key
    assert graph_key(sampler, energy, spec, 5, gen) != key
    assert graph_key(sampler, energy, (("x", (5, 2), torch.float32, "cpu"),), 4, gen) != key
    assert graph_key(sampler, energy, spec, 4, torch.Generator()) != key
    assert graph_key(sampler, energy, spec, 4, None) != key
    energy.eval()
    assert graph_key(sampler, energy, spec, 4, gen) != key
    energy.train()
    energy.beta = 0.5
    assert graph_key(sampler, energy, spec, 4, gen) != key
    del energy.beta
    sampler.step_size = 0.2
    assert graph_key(sampler, energy, spec, 4, gen) != key
    sampler.step_size = 0.1
    p = next(energy.parameters())
    p.data = p.data.clone()  # same values, new memory: the graph would read the old memory
    assert graph_key(sampler, energy, spec, 4, gen) != key


def _recordable(sampler, n: int):
    """The mixture, and a carry of ``n`` chains with the tensor step counter run_graphed
    gives ``record``."""
    energy = _mixture()
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    carry = _carry(sampler, energy, x0)
    carry.t = torch.zeros((), dtype=torch.long)
    return energy, carry


def test_warm_up_and_capture_leave_the_generator_and_the_chains_untouched(monkeypatch):
    """Recording draws random numbers (two warm-up steps and the captured ones) but restores
    the generator, and the carry given to ``record`` is not modified."""
    patch_cuda_graphs(monkeypatch)
    sampler = MALA(0.2)
    energy, carry = _recordable(sampler, 16)
    before = {k: torch.as_tensor(v).clone() for k, v in flatten_carry(carry).items()}
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    runner = GraphRunner.record(("k",), lambda c: sampler._advance(energy, c, gen), carry, 3, gen)
    assert runner is not None and runner.k == 3 and runner.key == ("k",)
    assert torch.equal(gen.get_state(), state)
    for k, v in flatten_carry(carry).items():
        assert torch.equal(torch.as_tensor(v), before[k]), k
    # one replay from the restored generator: the 3 steps an eager loop takes from it
    out = runner.replay({k: v for k, v in flatten_carry(carry).items() if not k.startswith("acc/")},
                        1, _Bar())
    ref, ref_gen = carry, torch.Generator().manual_seed(5)
    for _ in range(3):
        ref = sampler._advance(energy, ref, ref_gen)
    assert set(out) >= {"x", "energy", "grad", "first_bad", "n_reset", "t"}
    assert int(out["t"]) == 3
    torch.testing.assert_close(out["x"], ref.state.x)
    assert torch.equal(gen.get_state(), ref_gen.get_state())


def test_replay_returns_copies_and_zeroes_absent_running_sums(monkeypatch):
    """``replay`` loads the carry into the static tensors (running sums absent before the
    first step start at zero), and returns copies that later replays do not overwrite."""
    patch_cuda_graphs(monkeypatch)
    sampler = MALA(0.2)
    energy, carry = _recordable(sampler, 8)
    gen = torch.Generator().manual_seed(0)
    runner = GraphRunner.record(("k",), lambda c: sampler._advance(energy, c, gen), carry, 2, gen)
    flat = flatten_carry(carry)
    for v in runner.static.values():
        v.fill_(7)
    first = runner.replay(flat, 1, _Bar())
    assert int(first["t"]) == 2
    acc = [k for k in first if k.startswith("acc/")]
    assert acc  # MALA reports per-step acceptance
    kept = {k: v.clone() for k, v in first.items()}
    second = runner.replay(flat, 2, _Bar())
    assert int(second["t"]) == 4
    for k in first:
        assert torch.equal(first[k], kept[k]), k
    # the same running sums from 0 after 2 steps as the step-by-step loop
    ref = carry
    g2 = torch.Generator().manual_seed(0)
    ref = sampler._advance(energy, ref, g2)
    ref = sampler._advance(energy, ref, g2)
    for k in acc:
        torch.testing.assert_close(first[k], ref.acc[k[4:]])
    back = unflatten_carry(first, _Carry, ChainState)
    assert torch.equal(back.state.x, first["x"])


class _HostReadLangevin(Langevin):
    """A transition that reads a value on the host: cannot be captured."""

    def transition(self, energy, state, generator=None):
        if bool((state.x > 100).any()):  # a host read per step
            raise AssertionError
        return super().transition(energy, state, generator)


class _ChangingLangevin(Langevin):
    """A transition whose state gains a field after the first step: not recordable."""

    def transition(self, energy, state, generator=None):
        new, info = super().transition(energy, state, generator)
        extra = dict(new.extra)
        extra["seen"] = torch.ones(state.x.shape[0])
        return ChainState(new.x, new.energy, new.grad, extra), info


@pytest.mark.parametrize("cls,match", [
    (_HostReadLangevin, "recording the chain loop failed .*RuntimeError.*remove host synchronisation"),
    (_ChangingLangevin, "changes structure between steps"),
])
def test_uncapturable_transition_falls_back_with_a_warning(monkeypatch, cls, match):
    """A capture failure or a carry that changes structure: a warning saying why, no graph
    kept, the generator restored, and the chains then run eagerly with the same result."""
    patch_cuda_graphs(monkeypatch)
    energy = _mixture()
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    sampler = cls(0.05, graph_steps=4)
    gen = torch.Generator().manual_seed(4)
    state = gen.get_state()
    carry = _carry(sampler, energy, x0)
    with pytest.warns(UserWarning, match=match):
        out, done = run_graphed(sampler, energy, carry, 8, gen, _Bar())
    assert done == 0 and sampler._graph is None
    assert out.t == 0  # the eager loop counts steps in a Python int
    assert torch.equal(gen.get_state(), state)


def test_the_default_generator_is_saved_and_advanced_like_eager_steps(monkeypatch):
    """With no generator the graph draws from the default one (its state is saved before
    the warm-up and restored after, with the device named): the same chains as eager steps
    after the same global seed."""
    patch_cuda_graphs(monkeypatch)
    energy = _mixture()
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(21)
    ref = _carry(MALA(0.2), energy, x0)
    stepper = MALA(0.2)
    for _ in range(9):
        ref = stepper._advance(energy, ref, None)
    after_ref = torch.get_rng_state()
    torch.manual_seed(21)
    sampler = MALA(0.2, graph_steps=4)
    carry, done = run_graphed(sampler, energy, _carry(sampler, energy, x0), 9, None, _Bar())
    for _ in range(9 - done):
        carry = sampler._advance(energy, carry, None)
    assert done == 8
    torch.testing.assert_close(carry.state.x, ref.state.x)
    assert torch.equal(torch.get_rng_state(), after_ref)


def test_a_shorter_run_records_a_graph_of_its_own_length(monkeypatch):
    """K = min(graph_steps, n_steps) is part of the key: after 4-step graphs, a 3-step run
    records a 3-step graph (replaying the 4-step one would take one step too many)."""
    graphs = patch_cuda_graphs(monkeypatch)
    energy = _mixture()
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    sampler = Langevin(0.05, graph_steps=4)
    gen = torch.Generator()
    _graphed(sampler, energy, x0, 8, seed=1, gen=gen)
    out, _, done = _graphed(sampler, energy, x0, 3, seed=2, gen=gen)
    assert done == 3 and len(graphs) == 2 and sampler._graph.k == 3
    ref, _ = _stepwise(Langevin(0.05), energy, x0, 3, seed=2)
    torch.testing.assert_close(out.state.x, ref.state.x)
    assert int(out.t) == 3


class _ResizingLangevin(Langevin):
    """A transition that keeps its fields but changes the shape of one: not recordable."""

    def init_state(self, energy, x):
        state = super().init_state(energy, x)
        return ChainState(state.x, state.energy, state.grad, {"memo": torch.zeros(x.shape[0])})

    def transition(self, energy, state, generator=None):
        new, info = super().transition(energy, state, generator)
        memo = torch.zeros(state.x.shape[0], 2)
        return ChainState(new.x, new.energy, new.grad, {"memo": memo}), info


@pytest.mark.parametrize("cls,message", [
    (_HostReadLangevin,
     r"^cuda_graph: recording the chain loop failed \(RuntimeError: .*operation not permitted "
     r"when stream is capturing.*\); running eagerly instead \(remove host synchronisation "
     r"such as \.item\(\) or bool\(tensor\) from the sampler's transition\)$"),
    (_ChangingLangevin,
     r"^cuda_graph: the chain state changes structure between steps \(init_state and "
     r"transition return different fields or shapes\); running eagerly instead$"),
    (_ResizingLangevin,
     r"^cuda_graph: the chain state changes structure between steps \(init_state and "
     r"transition return different fields or shapes\); running eagerly instead$"),
])
def test_fallback_warnings_are_exact(monkeypatch, cls, message):
    """The whole message of each fallback."""
    patch_cuda_graphs(monkeypatch)
    energy = _mixture()
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    sampler = cls(0.05, graph_steps=4)
    carry = _carry(sampler, energy, x0)
    with pytest.warns(UserWarning, match=message) as caught:
        run_graphed(sampler, energy, carry, 8, torch.Generator().manual_seed(1), _Bar())
    assert len(caught) == 1 and sampler._graph is None


@pytest.mark.skipif("mutmut" in sys.modules,
                    reason="under mutmut every function is called through a trampoline frame")
@pytest.mark.parametrize("cls", [_HostReadLangevin, _ChangingLangevin])
def test_fallback_warnings_name_the_callers_line(monkeypatch, cls):
    """The warning points at the caller's file, not into ebmflow or torch."""
    patch_cuda_graphs(monkeypatch)
    energy = _mixture()
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    sampler = cls(0.05, graph_steps=4)
    with pytest.warns(UserWarning, match="cuda_graph") as caught:
        run_graphed(sampler, energy, _carry(sampler, energy, x0), 8, None, _Bar())
    assert [w.filename for w in caught] == [__file__]


def test_graphed_chain_tensors_stay_on_the_states_device(monkeypatch):
    """Every tensor of the carry after a graphed run (the step counter included) lives on
    the states' device; here PyTorch's ``meta`` device stands in for a GPU."""
    patch_cuda_graphs(monkeypatch)
    energy = _mixture().to("meta")
    x0 = torch.empty(8, 2, device="meta")
    sampler = Langevin(0.05, graph_steps=2)
    carry = _carry(sampler, energy, x0)
    carry.first_bad = carry.first_bad.to("meta")
    carry.n_reset = carry.n_reset.to("meta")
    out, done = run_graphed(sampler, energy, carry, 4, None, _Bar())
    assert done == 4
    flat = flatten_carry(out)
    assert {k: v.device.type for k, v in flat.items()} == {k: "meta" for k in flat}


def _recording_setup(monkeypatch, default_seed: int):
    """CPU graph capture patched in, a mixture and 8 chains, the default generator seeded:
    returns (energy, x0, the default generator's state before recording)."""
    patch_cuda_graphs(monkeypatch)
    energy = _mixture()
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(default_seed)
    return energy, x0, torch.get_rng_state()


@pytest.mark.parametrize("cls", [Langevin, _HostReadLangevin])
def test_recording_with_a_user_generator_leaves_the_default_generator_alone(monkeypatch, cls):
    """Saving and restoring around the warm-up and the capture touch only the generator the
    chains use: the default generator's state is the same after recording (or after a
    failed recording) as before."""
    energy, x0, before = _recording_setup(monkeypatch, default_seed=5)
    sampler = cls(0.05, graph_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_graphed(sampler, energy, _carry(sampler, energy, x0), 8,
                    torch.Generator().manual_seed(1), _Bar())
    assert torch.equal(torch.get_rng_state(), before)


def test_a_failed_recording_restores_the_default_generator(monkeypatch):
    """Without a generator, a capture that fails puts the default generator back (its
    device named) and warns; the default stream is as before."""
    energy, x0, before = _recording_setup(monkeypatch, default_seed=8)
    sampler = _HostReadLangevin(0.05, graph_steps=4)
    with pytest.warns(UserWarning, match="recording the chain loop failed"):
        _, done = run_graphed(sampler, energy, _carry(sampler, energy, x0), 8, None, _Bar())
    assert done == 0 and torch.equal(torch.get_rng_state(), before)
