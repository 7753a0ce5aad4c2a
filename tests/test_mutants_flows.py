"""Tests written from surviving mutants of ``ebmflow.flows`` (``tools/mutation.py``).

Each test checks exact values (hand-computed or from the defining formula), exact error
messages or exact warnings, so that a changed constant, comparison, argument or message in
the package makes it fail.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from ebmflow.energy import EnergyModel
from ebmflow.flows import ContinuousFlow, FlowMC, RealNVP
from ebmflow.flows.base import Flow, renamed_keyword
from ebmflow.flows.continuous import _check_method
from ebmflow.flows.flowmc import _make_optimizer
from ebmflow.spaces import Binary, Continuous

zuko = pytest.importorskip("zuko")
from ebmflow.flows.zuko_adapter import ZukoFlow  # noqa: E402


class Quad(EnergyModel):
    """E(x) = |x|^2 / 2 on Continuous(d)."""

    def __init__(self, d=2):
        super().__init__(Continuous(d))

    def energy(self, x):
        return 0.5 * x.pow(2).sum(-1)


class Bits(EnergyModel):
    def __init__(self):
        super().__init__(Binary(2))

    def energy(self, x):
        return x.sum(-1)


class Bare(Flow):
    """A Flow that implements nothing."""


def nvp(d=2):
    torch.manual_seed(0)
    return RealNVP(d, n_layers=2, hidden=(4,))


ERRORS = {
    "renamed": lambda: renamed_keyword("Where", "old", 1, "new", 2, 3),
    "flow_dim": lambda: Bare(0),
    "flow_dim_bool": lambda: Bare(True),
    "flow_fwd": lambda: Bare(2).forward(torch.zeros(1, 2)),
    "flow_inv": lambda: Bare(2).inverse(torch.zeros(1, 2)),
    "base_n": lambda: nvp().base_sample(0),
    "base_n_bool": lambda: nvp().base_sample(True),
    "check_input": lambda: nvp().log_prob(torch.zeros(4, 3)),
    "check_input_list": lambda: nvp().log_prob([1.0]),
    "fit_data": lambda: nvp().fit(torch.zeros(4), 1),
    "fit_both": lambda: nvp().fit(torch.zeros(4, 2), 1, n_steps=1),
    "nvp_layers": lambda: RealNVP(2, n_layers=0),
    "nvp_bound": lambda: RealNVP(2, scale_bound=0.0),
    "nvp_scale": lambda: RealNVP(2, scale=torch.tensor([1.0, 0.0])),
    "nvp_init": lambda: nvp().init_from_data(torch.zeros(3, 3)),
    "method_type": lambda: _check_method(3),
    "method_name": lambda: ContinuousFlow(2, method="foo"),
    "cnf_trace": lambda: ContinuousFlow(2, trace="x"),
    "cnf_noise": lambda: ContinuousFlow(2, noise="x"),
    "cnf_steps": lambda: ContinuousFlow(2, ode_steps=0),
    "cnf_steps_bool": lambda: ContinuousFlow(2, ode_steps=True),
    "cnf_both": lambda: ContinuousFlow(2, ode_steps=3, n_steps=3),
    "cnf_fm": lambda: ContinuousFlow(2).flow_matching_loss(torch.zeros(2, 3)),
    "as_flow": lambda: FlowMC("f"),
    "optim": lambda: _make_optimizer("sgd", [torch.zeros(1, requires_grad=True)], 0.1),
    "optim_flowmc": lambda: FlowMC(nvp(), optimizer="sgd"),
    "local": lambda: FlowMC(nvp(), "m"),
    "n_local": lambda: FlowMC(nvp(), n_local=-1),
    "n_global": lambda: FlowMC(nvp(), n_global=1.0),
    "n_rounds": lambda: FlowMC(nvp(), n_rounds=0),
    "flow_steps": lambda: FlowMC(nvp(), flow_steps=-1),
    "history": lambda: FlowMC(nvp(), history=True),
    "check_every": lambda: FlowMC(nvp(), check_every=-1),
    "n_chains": lambda: FlowMC(nvp(), n_chains=0),
    "train_examples": lambda: FlowMC(nvp(), train_examples=0),
    "flow_epochs": lambda: FlowMC(nvp(), flow_epochs=True),
    "train_updates": lambda: FlowMC(nvp(), train_updates=-1),
    "train_updates_float": lambda: FlowMC(nvp(), train_updates=1.0),
    "flow_batch_size": lambda: FlowMC(nvp(), flow_batch_size=0),
    "adapt_steps": lambda: FlowMC(nvp(), adapt_steps=-1),
    "flow_loss": lambda: FlowMC(nvp(), flow_loss="kl"),
    "flow_loss_fm": lambda: FlowMC(nvp(), flow_loss="flow_matching"),
    "pbs": lambda: FlowMC(nvp(), proposal_batch_size=0),
    "pbs_bool": lambda: FlowMC(nvp(), proposal_batch_size=True),
    "init": lambda: FlowMC(nvp(), init="data"),
    "compile": lambda: FlowMC(nvp(), compile="yes"),
    "logq_tol": lambda: FlowMC(nvp(), logq_tol=0),
    "logq_tol_str": lambda: FlowMC(nvp(), logq_tol="1"),
    "max_grad_norm": lambda: FlowMC(nvp(), max_grad_norm=0.0),
    "energy_space": lambda: FlowMC(nvp()).sample(Bits(), 2),
    "energy_dim": lambda: FlowMC(nvp(3)).sample(Quad(2), 2),
    "energy_type": lambda: FlowMC(nvp()).sample("e", 2),
    "sample_n": lambda: FlowMC(nvp()).sample(Quad()),
    "sample_too_many": lambda: FlowMC(nvp(), n_chains=2).sample(Quad(), 3),
    "update_data": lambda: FlowMC(nvp()).update(Quad(), torch.zeros(2, 3)),
    "zuko_type": lambda: ZukoFlow(torch.nn.Linear(2, 2)),
    "zuko_dim": lambda: ZukoFlow(zuko.flows.MAF(3, transforms=1), dim=2),
    "zuko_n": lambda: ZukoFlow(zuko.flows.MAF(2, transforms=1)).base_sample(0),
    "zuko_n2": lambda: ZukoFlow(zuko.flows.MAF(2, transforms=1)).sample_and_log_prob(0),
    "zuko_n_bool": lambda: ZukoFlow(zuko.flows.MAF(2, transforms=1)).base_sample(True),
    "zuko_not_nf": lambda: ZukoFlow(zuko.mixtures.GMM(2, components=2)).forward(torch.zeros(1, 2)),
    "zuko_no_gauss": lambda: ZukoFlow(zuko.mixtures.GMM(2, components=2)).base_sample(2),
    "zuko_meta_gen": lambda: ZukoFlow(zuko.flows.MAF(2, transforms=1)).to("meta").base_sample(2, torch.Generator()),
    "zuko_sample_n_bool": lambda: ZukoFlow(zuko.flows.MAF(2, transforms=1)).sample_and_log_prob(True),
    "zuko_logp": lambda: ZukoFlow(zuko.flows.MAF(2, transforms=1)).log_prob(torch.zeros(2, 3)),
    "cnf_logp": lambda: ContinuousFlow(2, hidden=(4,)).log_prob(torch.zeros(2, 3)),
    "update_meta": lambda: FlowMC(nvp()).update(_gm_target(), torch.zeros(3, 2, device="meta")),
}

MESSAGES = {
    'renamed': (ValueError, 'Where: pass new= only (old= is its deprecated name)'),
    'flow_dim': (ValueError, 'dim must be a positive int, got 0'),
    'flow_dim_bool': (ValueError, 'dim must be a positive int, got True'),
    'flow_fwd': (NotImplementedError, 'Bare must implement forward(z) -> (x, logdet) or override sample_and_log_prob'),
    'flow_inv': (NotImplementedError, 'Bare must implement inverse(x) -> (z, logdet) or override log_prob'),
    'base_n': (ValueError, 'n must be a positive int, got 0'),
    'base_n_bool': (ValueError, 'n must be a positive int, got True'),
    'check_input': (ValueError, 'x must have shape (B, 2) for RealNVP(dim=2), got (4, 3); flatten event dims with x.flatten(1)'),
    'check_input_list': (ValueError, 'x must have shape (B, 2) for RealNVP(dim=2), got list; flatten event dims with x.flatten(1)'),
    'fit_data': (ValueError, 'data must have shape (B, 2) for RealNVP(dim=2), got (4,); flatten event dims with data.flatten(1)'),
    'fit_both': (ValueError, 'Flow.fit: pass steps= only (n_steps= is its deprecated name)'),
    'nvp_layers': (ValueError, 'n_layers must be a positive int, got 0'),
    'nvp_bound': (ValueError, 'scale_bound must be positive, got 0.0'),
    'nvp_scale': (ValueError, 'scale must be positive, got [1.0, 0.0]'),
    'nvp_init': (ValueError, 'data must have shape (B, 2) for RealNVP(dim=2), got (3, 3); flatten event dims with data.flatten(1)'),
    'method_type': (ValueError, 'method must be a torchdiffeq solver name, got 3'),
    'method_name': (ValueError, 'method must be a torchdiffeq solver, got \'foo\' (Invalid method "foo". Must be one of {"dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver"}.)'),
    'cnf_trace': (ValueError, "trace must be 'auto', 'exact' or 'hutchinson', got 'x'"),
    'cnf_noise': (ValueError, "noise must be 'rademacher' or 'gaussian', got 'x'"),
    'cnf_steps': (ValueError, 'ode_steps must be a positive int, got 0'),
    'cnf_steps_bool': (ValueError, 'ode_steps must be a positive int, got True'),
    'cnf_both': (ValueError, 'ContinuousFlow: pass ode_steps= only (n_steps= is its deprecated name)'),
    'cnf_fm': (ValueError, 'x1 must have shape (B, 2) for ContinuousFlow(dim=2), got (2, 3); flatten event dims with x1.flatten(1)'),
    'as_flow': (ValueError, 'flow must be an ebmflow.flows.Flow (RealNVP, ContinuousFlow or a subclass) or a zuko flow (zuko.lazy.LazyDistribution, wrapped by ebmflow.flows.ZukoFlow), got str'),
    'optim': (ValueError, "optimizer must be 'adam', 'adamw' or a callable params -> Optimizer, got 'sgd'"),
    'optim_flowmc': (ValueError, "optimizer must be 'adam', 'adamw' or a callable params -> Optimizer, got 'sgd'"),
    'local': (ValueError, 'local must be a continuous MCMCSampler (e.g. MALA(), Langevin()), got str'),
    'n_local': (ValueError, 'n_local must be an int >= 0, got -1'),
    'n_global': (ValueError, 'n_global must be an int >= 0, got 1.0'),
    'n_rounds': (ValueError, 'n_rounds must be an int >= 1, got 0'),
    'flow_steps': (ValueError, 'flow_steps must be an int >= 0, got -1'),
    'history': (ValueError, 'history must be an int >= 0, got True'),
    'check_every': (ValueError, 'check_every must be an int >= 0, got -1'),
    'n_chains': (ValueError, 'n_chains must be a positive int or None, got 0'),
    'train_examples': (ValueError, 'train_examples must be a positive int or None, got 0'),
    'flow_epochs': (ValueError, 'flow_epochs must be a positive int or None, got True'),
    'train_updates': (ValueError, 'train_updates must be an int >= 0 or None, got -1'),
    'train_updates_float': (ValueError, 'train_updates must be an int >= 0 or None, got 1.0'),
    'flow_batch_size': (ValueError, 'flow_batch_size must be a positive int or None, got 0'),
    'adapt_steps': (ValueError, 'adapt_steps must be an int >= 0 or None, got -1'),
    'flow_loss': (ValueError, "flow_loss must be 'ml' or 'flow_matching', got 'kl'"),
    'flow_loss_fm': (ValueError, "flow_loss='flow_matching' needs a flow with flow_matching_loss (e.g. ContinuousFlow); RealNVP has none, use flow_loss='ml'"),
    'pbs': (ValueError, 'proposal_batch_size must be a positive int or None, got 0'),
    'pbs_bool': (ValueError, 'proposal_batch_size must be a positive int or None, got True'),
    'init': (ValueError, "init must be 'noise' or 'flow', got 'data'"),
    'compile': (ValueError, "compile must be True, False or 'auto', got 'yes'"),
    'logq_tol': (ValueError, 'logq_tol must be a positive number (nats), got 0'),
    'logq_tol_str': (ValueError, "logq_tol must be a positive number (nats), got '1'"),
    'max_grad_norm': (ValueError, 'max_grad_norm must be > 0 or None, got 0.0'),
    'energy_space': (ValueError, "FlowMC samples continuous states but the energy's space is Binary(2); use a discrete sampler (Gibbs, GibbsWithGradients, DiscreteLangevin)"),
    'energy_dim': (ValueError, "the flow has dim=3 but the energy's space Continuous(2) has 2 coordinates; build the flow with dim=2"),
    'energy_type': (ValueError, 'energy must be an ebmflow EnergyModel, got str; subclass ebmflow.energy.EnergyModel and implement energy()'),
    'sample_n': (ValueError, 'pass n (number of states) or x0, or set n_chains'),
    'sample_too_many': (ValueError, 'n=3 but FlowMC keeps 2 persistent chains; pass n <= 2 or build FlowMC(n_chains=3)'),
    'update_data': (ValueError, 'data has shape (2, 3) but Continuous(2) expects (B, 2); batch dimension first'),
    'zuko_type': (ValueError, 'flow must be a zuko LazyDistribution (e.g. zuko.flows.NSF(dim)), got Linear; ebmflow flows need no adapter'),
    'zuko_dim': (ValueError, "dim=2 but the zuko flow's event shape is (3,); pass dim=3 or omit it"),
    'zuko_n': (ValueError, 'n must be a positive int, got 0'),
    'zuko_n2': (ValueError, 'n must be a positive int, got 0'),
    'zuko_n_bool': (ValueError, 'n must be a positive int, got True'),
    'zuko_not_nf': (ValueError, 'the zuko distribution Mixture is not a NormalizingFlow (no transform/base): only log_prob and sample_and_log_prob are available'),
    'zuko_no_gauss': (TypeError, 'Mixture has no Gaussian base: it cannot be sampled from standard normal noise'),
    'zuko_meta_gen': (ValueError, "generator is on cpu but the flow is on meta; create it with torch.Generator(device='meta')"),
    'zuko_sample_n_bool': (ValueError, 'n must be a positive int, got True'),
    'zuko_logp': (ValueError, 'x must have shape (B, 2) for ZukoFlow(dim=2), got (2, 3); flatten event dims with x.flatten(1)'),
    'cnf_logp': (ValueError, 'x must have shape (B, 2) for ContinuousFlow(dim=2), got (2, 3); flatten event dims with x.flatten(1)'),
    'update_meta': (ValueError, "data is on device meta but the model is on cpu; move it first, e.g. data = data.to('cpu')"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_messages_are_exact(case):
    kind, message = MESSAGES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(kind) as info:
            ERRORS[case]()
    assert str(info.value) == message


def test_flowmc_refuses_a_hutchinson_flow_naming_the_fix():
    with pytest.raises(ValueError) as info:
        FlowMC(ContinuousFlow(9))
    msg = str(info.value)
    assert msg.startswith("FlowMC needs an exact log q for its Metropolis-Hastings proposals, but "
                          "ContinuousFlow(\n  dim=9, method='rk4', ode_steps=16, trace=hutchinson")
    assert msg.endswith(
        ") estimates the trace stochastically (Hutchinson; ContinuousFlow uses it for "
        "trace='auto' above 8 dimensions); build it with ContinuousFlow(dim, trace='exact') (D "
        "backward passes per ODE evaluation)")


def test_standard_normal_log_prob_and_the_identity_realnvp():
    from ebmflow.flows.base import standard_normal_log_prob

    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, -2.0]])
    torch.testing.assert_close(standard_normal_log_prob(z),
                               torch.tensor([-1.5 * math.log(2 * math.pi),
                                             -4.5 - 1.5 * math.log(2 * math.pi)]))
    flow = RealNVP(3, n_layers=2, hidden=(4,), loc=1.0, scale=2.0)
    # a new RealNVP is the affine map x = loc + scale z: log q(x) = log N(z) - D log scale
    x = torch.tensor([[1.0, 3.0, -1.0]])
    torch.testing.assert_close(flow.log_prob(x), standard_normal_log_prob((x - 1.0) / 2.0)
                               - 3 * math.log(2.0))
    xs, logdet = flow(torch.tensor([[0.0, 1.0, -1.0]]))
    torch.testing.assert_close(xs, x)
    torch.testing.assert_close(logdet, torch.tensor([3 * math.log(2.0)]))


def _two_global_seeds(make, act):
    """``act(make(), generator)`` under two global seeds: equal when every draw comes from
    the generator."""
    out = []
    for seed in (1, 2):
        obj = make()
        torch.manual_seed(seed)
        out.append(act(obj, torch.Generator().manual_seed(5)))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    return out[0]


def test_zuko_base_sample_is_standard_normal_noise_from_the_generator():
    torch.manual_seed(0)
    flow = ZukoFlow(zuko.flows.MAF(2, transforms=1))
    z = _two_global_seeds(lambda: flow, lambda f, g: f.base_sample(3, g))
    torch.testing.assert_close(z, torch.randn((3, 2), generator=torch.Generator().manual_seed(5)))
    assert flow.base_sample(1).shape == (1, 2)


def test_hutchinson_divergence_values_and_graph():
    from ebmflow.flows.continuous import hutchinson_divergence

    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    v = x @ a.T + x.pow(2)
    eps = torch.tensor([[0.5, -2.0], [1.5, 0.25]])
    # eps^T (A + diag(2 x)) eps
    expected = torch.stack([e @ (a + torch.diag(2 * xb)) @ e for e, xb in zip(eps, x.detach())])
    got = hutchinson_divergence(v, x, eps)
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad
    assert hutchinson_divergence(v, x, eps, create_graph=True).requires_grad


def test_continuous_flow_repr():
    assert ContinuousFlow(2, hidden=(4,), ode_steps=3).extra_repr() == (
        "dim=2, method='rk4', ode_steps=3, trace=exact, adjoint=False")
    assert ContinuousFlow(9, hidden=(4,)).extra_repr() == (
        "dim=9, method='rk4', ode_steps=16, trace=hutchinson, adjoint=False")


@pytest.mark.parametrize("init", ["flow", "noise"])
def test_flowmc_initial_chains_come_from_the_generator(init):
    def act(fm, g):
        return fm.sample(Quad(), 4, generator=g)

    x = _two_global_seeds(lambda: FlowMC(_wobbly_realnvp(), n_local=0, n_global=0, init=init), act)
    g = torch.Generator().manual_seed(5)
    expected = _wobbly_realnvp().sample(4, g) if init == "flow" else torch.randn((4, 2), generator=g)
    torch.testing.assert_close(x, expected)


def test_flowmc_reset_keeps_the_device():
    fm = FlowMC(nvp(), history=2)
    fm.chains = torch.zeros(3, 2, device="meta")
    fm.history_states = torch.zeros(2, 3, 2, device="meta")
    fm._hist_pos, fm._hist_len = 1, 2
    fm.reset()
    assert fm.chains.device.type == "meta" and fm.chains.numel() == 0
    assert fm.history_states.device.type == "meta" and fm.history_states.numel() == 0
    assert fm._hist_pos == fm._hist_len == 0


def _trained(scheduler=True):
    torch.manual_seed(0)
    fm = FlowMC(nvp(), n_local=1, n_global=2, history=3,
                scheduler=(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
                if scheduler else None)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        fm.sample(Quad(), 5, generator=g)
        fm.update(Quad(), generator=g)
    return fm


def test_flowmc_checkpoint_round_trip_of_counters_scheduler_and_history():
    src = _trained()
    extra = src.get_extra_state()
    assert set(extra) == {"optimizer", "scheduler", "n_flow_updates", "n_fits", "history"}
    assert extra["n_fits"] == 2 and extra["n_flow_updates"] == 2 and extra["history"] == (1, 3)
    assert extra["scheduler"]["last_epoch"] == 2
    dst = FlowMC(nvp(), n_local=1, n_global=2, history=3,
                 scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    dst.load_state_dict(src.state_dict())
    assert dst.n_fits == 2 and dst.n_flow_updates == 2 and (dst._hist_pos, dst._hist_len) == (1, 3)
    assert dst.scheduler.state_dict() == src.scheduler.state_dict()
    assert dst.optimizer.param_groups[0]["lr"] == src.optimizer.param_groups[0]["lr"] == 2.5e-4
    torch.testing.assert_close(dst.chains, src.chains)
    torch.testing.assert_close(dst.history_states, src.history_states)
    assert dst.history_states.shape == (3, 5, 2)


def test_flowmc_extra_state_defaults_and_missing_parts():
    fm = _trained(scheduler=False)
    fm.set_extra_state({})
    assert fm.n_fits == 0 and fm.n_flow_updates == 0 and (fm._hist_pos, fm._hist_len) == (0, 0)
    fm.set_extra_state({"optimizer": None, "scheduler": {"last_epoch": 3}})  # no scheduler here
    frozen = RealNVP(2, n_layers=1, hidden=(2,)).requires_grad_(False)
    fm = FlowMC(frozen)
    assert fm.optimizer is None and fm.get_extra_state()["optimizer"] is None


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta:UserWarning")
def test_flowmc_loads_into_buffers_on_their_device():
    src = _trained(scheduler=False)
    dst = FlowMC(nvp(), n_local=1, n_global=2, history=3).to("meta")
    dst.load_state_dict(src.state_dict())
    assert dst.chains.device.type == "meta" and dst.chains.shape == (5, 2)
    assert dst.history_states.device.type == "meta" and dst.history_states.shape == (3, 5, 2)


class _Cheap(Flow):
    """log q(x) = -|x - mu|^2 (cheap to fit); records the batch sizes; one unused parameter."""

    def __init__(self):
        super().__init__(2)
        self.mu = torch.nn.Parameter(torch.zeros(2))
        self.unused = torch.nn.Parameter(torch.zeros(()))
        self.sizes = []

    def log_prob(self, x):
        self.sizes.append(x.shape[0])
        return -(x - self.mu).pow(2).sum(-1)


def test_fit_defaults_and_gradient_clearing(monkeypatch):
    lrs = []
    import ebmflow.flows.base as flow_base

    def adam(params, lr):
        lrs.append(lr)
        return torch.optim.SGD(params, lr=0.0)

    monkeypatch.setattr(flow_base, "default_adam", adam)
    flow = _Cheap()
    flow.unused.grad = torch.ones(())
    losses = flow.fit(torch.randn(300, 2, generator=torch.Generator().manual_seed(0)))
    assert losses.shape == (1000,) and lrs == [1e-3]
    assert set(flow.sizes) == {256}
    assert flow.unused.grad is None  # zero_grad(set_to_none=True)
    one = _Cheap()
    losses = one.fit(torch.tensor([[1.0, 2.0]]), 3)  # a single row: index 0 is drawn
    torch.testing.assert_close(losses, torch.full((3,), 5.0))


def test_fit_on_the_datas_device():
    flow = _Cheap().to("meta")
    losses = flow.fit(torch.zeros(4, 2, device="meta"), 2)
    assert losses.device.type == "meta"


def test_hutchinson_log_prob_draws_from_the_generator():
    torch.manual_seed(0)
    flow = ContinuousFlow(2, hidden=(4,), trace="hutchinson", noise="gaussian", ode_steps=2)
    with torch.no_grad():
        flow.velocity.net[-1].weight.normal_()
    x = torch.tensor([[0.5, -1.0], [1.0, 0.0], [-0.5, 2.0], [0.0, 0.3]])
    lp = _two_global_seeds(lambda: flow, lambda f, g: f.log_prob(x, g))
    z = _two_global_seeds(lambda: flow, lambda f, g: f.inverse(x, g)[1])
    from ebmflow.flows.base import standard_normal_log_prob

    torch.testing.assert_close(lp, standard_normal_log_prob(flow.inverse(x, torch.Generator().manual_seed(5))[0]) + z)


def test_flowmc_default_local_kernel():
    local = FlowMC(nvp()).local
    assert type(local).__name__ == "MALA" and local.n_warmup == 100 and local.step_size == 0.005


def test_zuko_samples_through_the_gaussian_base_noise():
    from ebmflow.flows.zuko_adapter import _is_gaussian

    torch.manual_seed(0)
    flow = ZukoFlow(zuko.flows.MAF(2, transforms=1))
    dist = flow.flow()
    assert _is_gaussian(dist.base) and _is_gaussian(torch.distributions.Normal(0.0, 1.0))
    assert not _is_gaussian(torch.distributions.Uniform(0.0, 1.0))
    x, lq = flow.sample_and_log_prob(3, torch.Generator().manual_seed(1))
    eps = torch.randn((3, 2), generator=torch.Generator().manual_seed(1))
    xe, ladj = dist.transform.inv.call_and_ladj(eps)  # base N(0, I): z = eps
    torch.testing.assert_close(x, xe)
    torch.testing.assert_close(lq, dist.base.log_prob(eps) - ladj)
    xs, lqs = flow.sample_from_base(eps)
    torch.testing.assert_close(xs, xe)
    assert flow.sample_and_log_prob(1)[0].shape == (1, 2)
    double = ZukoFlow(zuko.flows.MAF(2, transforms=1)).double()
    assert double.base_sample(2).dtype == torch.float64
    assert ZukoFlow(zuko.flows.MAF(2, transforms=1)).to("meta").base_sample(2).device.type == "meta"


def _gm_target():
    from ebmflow.energy import GaussianMixtureEnergy

    return GaussianMixtureEnergy(torch.tensor([[-2.0, 0.0], [2.0, 0.5]]), torch.tensor([0.8, 0.9]),
                                 torch.tensor([0.6, 0.4]))


def _wobbly_realnvp():
    torch.manual_seed(0)
    flow = RealNVP(2, n_layers=2, hidden=(8,), scale=torch.tensor([2.5, 1.2]))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow


def _wobbly_zuko():
    torch.manual_seed(0)
    return ZukoFlow(zuko.flows.MAF(2, transforms=2, hidden_features=(8,)))


@pytest.mark.parametrize(("make_flow", "kw", "ks"), [
    (_wobbly_realnvp, dict(n_local=2, n_global=5, proposal_batch_size=64), {4, 1}),
    (_wobbly_realnvp, dict(n_local=0, n_global=3, proposal_batch_size=None), {3}),
    (_wobbly_zuko, dict(n_local=1, n_global=3, proposal_batch_size=32), {2, 1}),
], ids=["chunks", "global-only", "zuko"])
def test_compiled_global_moves_are_the_eager_moves(monkeypatch, make_flow, kw, ks):
    """compile=True with ``torch.compile`` replaced by the identity (the chunks' own logic
    without dynamo; ``tests/test_flowmc_compiled.py`` compiles for real)."""
    from ebmflow.samplers import MALA

    backends = []

    def fake_compile(fn, **kwargs):
        backends.append(kwargs.get("backend"))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    x0 = 2.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    runs = []
    for compiled in (False, True):
        flow = make_flow()
        s = FlowMC(flow, MALA(0.1), flow_steps=0, compile=compiled, **kw)
        s.compile_backend = "eager"
        g = torch.Generator().manual_seed(1)
        x = s.sample(_gm_target(), x0=x0, generator=g, n_rounds=2)
        runs.append((s, x, g))
    (s_e, x_e, g_e), (s_c, x_c, g_c) = runs
    assert s_c._compile_failed is None and s_c.compile_seconds is not None
    assert {key[3] for key in s_c._blocks} == ks and set(backends) == {"eager"}
    for key, block in s_c._blocks.items():
        assert key[1] == id(s_c.flow) and key[-2:] == (True, True) and block.key == key
    torch.testing.assert_close(x_c, x_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_c.chain_stats["global_accept"], s_e.chain_stats["global_accept"])
    for key in ("local_accept", "global_accept", "flow_nonfinite"):
        torch.testing.assert_close(s_c.stats[key], s_e.stats[key])
    assert 0.0 < float(s_e.stats["global_accept"]) < 1.0
    assert torch.equal(g_c.get_state(), g_e.get_state())


def test_a_flow_drawing_outside_rng_falls_back_with_a_warning(monkeypatch):
    from ebmflow.samplers import MALA, CompileFallbackWarning

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)

    class OwnNoise(RealNVP):
        def base_sample(self, n, generator=None):
            return torch.randn((n, self.dim), generator=generator)

    torch.manual_seed(0)
    s = FlowMC(OwnNoise(2, n_layers=2, hidden=(4,)), MALA(0.1), n_local=1, n_global=2,
               flow_steps=0, compile=True)
    with pytest.warns(CompileFallbackWarning) as rec:
        x = s.sample(_gm_target(), x0=torch.zeros(4, 2), generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 2) and s._blocks == {}
    assert s._compile_failed.startswith(
        "OwnNoise.sample_and_log_prob draws random numbers without ebmflow.samplers.rng (")
    assert "FlowMC" in str(rec[0].message) and s._compile_failed in str(rec[0].message)


def test_flowmc_schedule_defaults():
    from ebmflow.samplers import MALA

    local = MALA(0.05)
    s = FlowMC.flowmc_schedule(nvp(), local)
    assert s.local is local
    assert s.flow_epochs == 5 and s.history == 100 and s.train_examples == 10_000
    assert s.flow_batch_size == 10_000 and s.train_updates is None and s.max_grad_norm == 1.0
    assert type(s.optimizer).__name__ == "AdamW" and s.optimizer.param_groups[0]["lr"] == 1e-3


def test_zuko_import_error_names_the_install(monkeypatch):
    import sys

    from ebmflow.flows.zuko_adapter import _import_zuko

    monkeypatch.setitem(sys.modules, "zuko", None)
    with pytest.raises(ImportError) as info:
        _import_zuko()
    assert str(info.value) == ("ZukoFlow needs zuko; install it with `pip install zuko` or `pip "
                               "install ebmflow[zuko]`")


def test_zuko_flow_over_matrices_is_refused():
    class Matrices(zuko.lazy.LazyDistribution):
        def forward(self, c=None):
            normal = torch.distributions.Normal(torch.zeros(2, 2), torch.ones(2, 2))
            return torch.distributions.Independent(normal, 2)

    with pytest.raises(ValueError) as info:
        ZukoFlow(Matrices())
    assert str(info.value) == ("ZukoFlow needs a flow over vectors (event shape (D,)), got event "
                               "shape (2, 2)")


def _health(chains, ref=None, best=math.inf, flow=None):
    fm = FlowMC(flow if flow is not None else nvp(chains.shape[1]))
    fm.chains = chains
    fm._health_ref = ref
    fm._best_loss = best
    return fm


def test_check_health_values_and_first_reference():
    chains = torch.tensor([[0.0, 1.0], [1.0, 1.5], [2.0, 3.0], [0.5, 0.0]])
    fm = _health(chains)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fm.check_health()
    spread = float(chains.std(0).mean())
    far = float((chains - chains.median(0).values).abs().max())
    assert out == {"flow_loss": 0.0, "spread": pytest.approx(spread, rel=1e-6),
                   "farthest": pytest.approx(far, rel=1e-6)}
    assert fm._health_ref == (pytest.approx(spread, rel=1e-6), pytest.approx(far, rel=1e-6))
    small = _health(torch.tensor([[0.0], [0.5], [0.25]]))
    small.check_health()
    assert small._health_ref == (pytest.approx(0.25, rel=1e-6), pytest.approx(0.25, rel=1e-6))
    one = _health(torch.tensor([[3.0]]))
    with warnings.catch_warnings():  # a single chain has no spread: never "collapsed"
        warnings.simplefilter("error")
        assert one.check_health() == {"flow_loss": 0.0, "spread": 0.0, "farthest": 0.0}
    assert one._health_ref == (1e-12, 1e-12)
    two = _health(torch.tensor([[0.0], [2.0]]))
    assert two.check_health()["spread"] == pytest.approx(2 ** 0.5, rel=1e-6)


def test_check_health_thresholds():
    line = torch.tensor([[0.0], [1.0], [2.0]])  # spread 1, farthest 1 from the median
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _health(line, ref=(50.0, 1.0)).check_health()  # spread = 2% of the first: no warning
        _health(line, ref=(1.0, 0.02)).check_health()  # farthest = 50 times: no warning
        _health(line, ref=(1.0, 1.0), best=1.0).check_health(torch.tensor(11.0))  # best + 10 D
        plane = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # D = 2: best + 20
        _health(plane, ref=(0.5, 1.0), best=1.0).check_health(torch.tensor(21.0))
    with pytest.warns(RuntimeWarning) as rec:
        _health(line, ref=(100.0, 1.0)).check_health()
    assert str(rec[0].message) == (
        "FlowMC: the chains collapsed (spread 1, first check 100); the energy or the flow "
        "concentrated on one point. Check the energy's training (lower its lr, add the CD "
        "regulariser alpha) and do not fit a flow to the chains of an energy tilted by it")
    with pytest.warns(RuntimeWarning) as rec:
        _health(line, ref=(1.0, 0.0199)).check_health()
    assert str(rec[0].message) == (
        "FlowMC: the chains ran away (farthest 1 from their median, first check 0.0199); the "
        "energy is not confining or the local step is too large. Add the CD regulariser alpha, "
        "lower the energy's lr or the local step size")
    with pytest.warns(RuntimeWarning, match="exploded"):
        _health(plane, ref=(0.5, 1.0), best=1.0).check_health(torch.tensor(21.5))
    with pytest.warns(RuntimeWarning) as rec:
        fm = _health(line, ref=(1.0, 1.0), best=1.0)
        fm.check_health(torch.tensor(11.5))
    assert str(rec[0].message) == (
        "FlowMC: the flow loss exploded (11.5, best so far 1); the flow or the chains diverged. "
        "Lower the flow lr, clip harder (max_grad_norm=1.0), or freeze a flow fitted to the data "
        "(flow_steps=0)")
    assert fm._best_loss == 1.0
    fm.check_health(torch.tensor(0.5))
    assert fm._best_loss == 0.5


def test_check_health_rechecks_flows_with_a_numerical_inverse(monkeypatch):
    calls = []
    spread = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    cnf = _health(spread, flow=ContinuousFlow(2, hidden=(4,)))
    monkeypatch.setattr(cnf, "_check_flow", lambda: calls.append("cnf"))
    cnf.check_health()
    nvp_fm = _health(spread)
    monkeypatch.setattr(nvp_fm, "_check_flow", lambda: calls.append("nvp"))
    nvp_fm.check_health()
    assert calls == ["cnf"]


def _kernel(**attrs):
    """A module with only the given attributes (stands in for FlowMC's local kernel)."""
    m = torch.nn.Module()
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def test_retune_local_needs_a_reset_and_a_warm_up():
    fm = FlowMC(nvp())
    calls = []
    fm.local = _kernel(reset_adaptation=lambda: calls.append("reset"), n_warmup=1)
    fm._retune_local()
    fm.local = _kernel(reset_adaptation=lambda: calls.append("none"), n_warmup=0)
    fm._retune_local()
    fm.local = _kernel(reset_adaptation=lambda: calls.append("no n_warmup"))
    fm._retune_local()
    fm.local = _kernel(n_warmup=5)  # nothing to reset
    fm._retune_local()
    assert calls == ["reset"]


def test_training_set_is_the_history_once_recorded():
    fm = FlowMC(nvp(), history=2)
    fm.chains = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    fm.history_states = torch.arange(8.0).reshape(2, 2, 2)
    fm._hist_len = 0  # nothing recorded yet: the chains
    torch.testing.assert_close(fm._training_set(None), fm.chains)
    fm._hist_len = 1
    torch.testing.assert_close(fm._training_set(None), fm.history_states[0])
    fm.history = 1
    torch.testing.assert_close(fm._training_set(None), fm.history_states[0])
    fm.history, fm._hist_len = 0, 2  # no history kept: the chains
    torch.testing.assert_close(fm._training_set(None), fm.chains)
    fm.history = 2
    torch.testing.assert_close(fm._training_set(None), fm.history_states.reshape(4, 2))
    fm.train_examples = 6
    got = _two_global_seeds(lambda: fm, lambda f, g: f._training_set(g))
    idx = torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, fm.history_states.reshape(4, 2)[idx])
    fm.history = 0
    fm.chains = torch.tensor([[3.0, 4.0]])  # one row: index 0 every time
    torch.testing.assert_close(fm._training_set(None), torch.tensor([[3.0, 4.0]]).expand(6, 2))


def test_tilt_feedback_warning_once_for_the_same_flow():
    from types import SimpleNamespace

    fm = FlowMC(nvp())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm._warn_tilt_feedback(SimpleNamespace(flow=nvp()))  # another flow
        fm._warn_tilt_feedback(Quad())
    with pytest.warns(RuntimeWarning) as rec:
        fm._warn_tilt_feedback(SimpleNamespace(flow=fm.flow))
    assert str(rec[0].message) == (
        "FlowMC is fitting the flow to the chains of an energy tilted by that same flow "
        "(TiltedEnergy): each fit absorbs the tilt into q and feeds it back, and the model "
        "drifts or collapses; fit the flow to the data first (flow.fit(data)) and freeze it "
        "(FlowMC(..., flow_steps=0))")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm._warn_tilt_feedback(SimpleNamespace(flow=fm.flow))  # once
    wrapped = FlowMC(_wobbly_zuko())
    with pytest.warns(RuntimeWarning, match="tilted by that same flow"):
        wrapped._warn_tilt_feedback(SimpleNamespace(flow=wrapped.flow.flow))


def test_update_counts_calls_checks_health_when_due_and_skips_zero_steps(monkeypatch):
    fm = FlowMC(nvp(), check_every=2)
    due = []
    monkeypatch.setattr(fm, "check_health", lambda loss=None: due.append(fm._n_calls))
    data = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        fm.update(Quad(), data)
    assert fm._n_calls == 3 and due == [1, 2]
    idle = FlowMC(nvp(), flow_steps=0)
    assert idle.update(Quad(), data) == {} and idle.n_fits == 0 and idle.n_flow_updates == 0


def test_update_draws_only_from_the_generator():
    data = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))

    def make():
        fm = FlowMC(nvp(), history=2, train_examples=6, flow_epochs=2, flow_batch_size=4)
        fm.chains = data.clone()
        fm._record(data)
        return fm

    def act(fm, g):
        out = fm.update(Quad(), generator=g)
        return torch.cat([out["flow_loss"].reshape(1)] + [p.detach().flatten() for p in fm.flow.parameters()])

    _two_global_seeds(make, act)


class _CheapMC(Flow):
    """log q(x) = -|x - mu|^2, an unused parameter, and the batches its nll saw."""

    def __init__(self):
        super().__init__(2)
        self.mu = torch.nn.Parameter(torch.zeros(2))
        self.unused = torch.nn.Parameter(torch.zeros(()))
        self.batches = []

    def log_prob(self, x):
        self.batches.append(x.detach().clone())
        return -(x - self.mu).pow(2).sum(-1)


def test_update_batches_gradients_and_sync():
    rows = torch.arange(16.0).reshape(8, 2)
    fm = FlowMC(_CheapMC(), flow_epochs=1, flow_batch_size=4)
    fm.chains = rows.clone()
    synced = []
    fm.grad_sync = synced.append
    fm.flow.unused.grad = torch.ones(())
    fm.update(Quad(), generator=torch.Generator().manual_seed(0))
    seen = torch.cat(fm.flow.batches)
    assert [len(b) for b in fm.flow.batches] == [4, 4]
    assert sorted(seen[:, 0].tolist()) == rows[:, 0].tolist()  # an epoch sees every row once
    assert fm.flow.unused.grad is None  # zero_grad(set_to_none=True)
    assert len(synced) == 2 and [id(p) for p in synced[0]] == [id(p) for p in fm.flow.parameters()]
    # flow_steps with a smaller batch: a random subset; the whole set needs no draw
    fm = FlowMC(_CheapMC(), flow_steps=2, flow_batch_size=3)
    fm.chains = rows.clone()
    fm.update(Quad(), generator=torch.Generator().manual_seed(0))
    assert [len(b) for b in fm.flow.batches] == [3, 3]
    fm = FlowMC(_CheapMC(), flow_steps=1, flow_batch_size=8)
    fm.chains = rows.clone()
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    fm.update(Quad(), generator=g)
    assert torch.equal(fm.flow.batches[0], rows) and torch.equal(g.get_state(), before)
    data = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))

    def subset(fm, g):
        fm.update(Quad(), generator=g)
        return torch.cat(fm.flow.batches)

    def make():
        fm = FlowMC(_CheapMC(), flow_steps=2, flow_batch_size=3)
        fm.chains = data.clone()
        return fm

    _two_global_seeds(make, subset)


def test_flow_matching_update_draws_from_the_generator():
    data = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))

    def make():
        torch.manual_seed(0)
        fm = FlowMC(ContinuousFlow(2, hidden=(4,), ode_steps=2), flow_loss="flow_matching")
        fm.chains = data.clone()
        return fm

    _two_global_seeds(make, lambda fm, g: fm.update(Quad(), generator=g)["flow_loss"])


def test_record_reallocates_on_a_new_shape_or_device():
    fm = FlowMC(nvp(), history=3)
    fm._record(torch.zeros(2, 2))
    fm._record(torch.ones(2, 2))
    assert (fm._hist_pos, fm._hist_len) == (2, 2)
    fm._record(torch.full((3, 2), 2.0))  # three chains now: a new buffer
    assert fm.history_states.shape == (3, 3, 2) and (fm._hist_pos, fm._hist_len) == (1, 1)
    torch.testing.assert_close(fm.history_states[0], torch.full((3, 2), 2.0))
    fm._record(torch.zeros(3, 2, device="meta"))
    assert fm.history_states.device.type == "meta" and (fm._hist_pos, fm._hist_len) == (1, 1)
    double = FlowMC(nvp(), history=2)
    double._record(torch.zeros(3, 2, dtype=torch.float64))  # the buffer takes the states' dtype
    assert double.history_states.dtype == torch.float64


def test_cached_energy_of_the_local_kernel():
    from types import SimpleNamespace

    fm = FlowMC(nvp())
    x = torch.zeros(2, 2)
    fm.local.last_state = SimpleNamespace(x=x, energy=torch.ones(3))
    assert fm._cached_energy(x) is None  # wrong shape
    fm.local.last_state = SimpleNamespace(x=x, energy=torch.ones(2))
    assert torch.equal(fm._cached_energy(x), torch.ones(2))
    assert fm._cached_energy(x.clone()) is None


def test_global_moves_use_the_cached_energy(monkeypatch):
    from ebmflow.samplers import MALA

    fm = FlowMC(nvp(), MALA(0.1), n_local=1, n_global=1)
    seen = []
    real = fm._global_init

    def spy(energy, flat):
        seen.append(sorted(flat))
        return real(energy, flat)

    monkeypatch.setattr(fm, "_global_init", spy)
    fm.sample(Quad(), x0=torch.zeros(3, 2), generator=torch.Generator().manual_seed(0))
    assert seen == [["e", "x"]]


class _Fixed(Flow):
    """Proposes the given states (in order), with log q = 0 everywhere."""

    def __init__(self, proposals):
        super().__init__(proposals.shape[1])
        self.proposals = proposals

    def log_prob(self, x):
        return torch.zeros(x.shape[0], dtype=x.dtype)

    def sample_and_log_prob(self, n, generator=None):
        return self.proposals[:n], torch.zeros(n, dtype=self.proposals.dtype)


class _Counting(Quad):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def energy(self, x):
        self.calls += 1
        return super().energy(x)


def test_global_chunk_acceptance_is_strict_and_rejects_non_finite_proposals():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    # chain 0: the same state (key = v(x): rejected); chain 1: NaN (rejected); chain 2: closer
    prop = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [1.0, 0.0]])
    fm = FlowMC(_Fixed(prop), n_local=0, n_global=1)
    energy = _Counting()
    flat = fm._global_init(energy, {"x": x, "e": energy(x)})
    assert energy.calls == 1  # the cached E(x) is used
    log_u = torch.zeros(1, 3)  # u = 1
    out = fm._global_chunk(energy, flat, log_u, None, 1)
    assert out["acc"].tolist() == [0.0, 0.0, 1.0] and bool(out["bad"])
    torch.testing.assert_close(out["x"], torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]]))
    # k = 2: the same rules move by move
    prop2 = torch.cat([prop, torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.5, 0.0]])])
    fm2 = FlowMC(_Fixed(prop2), n_local=0, n_global=2)
    out = fm2._global_chunk(energy, fm2._global_init(energy, {"x": x}), torch.zeros(2, 3), None, 2)
    assert out["acc"].tolist() == [0.0, 1.0, 2.0]
    torch.testing.assert_close(out["x"], torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.5, 0.0]]))


def test_global_init_keeps_the_states_dtype():
    fm = FlowMC(nvp().double(), n_local=0)
    x = torch.zeros(2, 2, dtype=torch.float64)
    flat = fm._global_init(Quad(), {"x": x})
    assert flat["acc"].dtype == torch.float64 and flat["v"].dtype == torch.float64


def test_compile_false_never_uses_compiled_moves():
    fm = FlowMC(nvp(), compile=False)
    assert fm._use_compiled(torch.zeros(2, 2)) is False
    fm = FlowMC(nvp(), compile=True)
    fm._compile_failed = "an earlier failure"
    assert fm._use_compiled(torch.zeros(2, 2)) is False


def _counting_forwards(monkeypatch):
    counts = {"linear": 0, "silu": 0}
    linear, silu = torch.nn.Linear.forward, torch.nn.SiLU.forward

    def lin(self, x):
        counts["linear"] += 1
        return linear(self, x)

    def act(self, x):
        counts["silu"] += 1
        return silu(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", lin)
    monkeypatch.setattr(torch.nn.SiLU, "forward", act)
    return counts


def test_realnvp_conditioner_runs_functionally_unless_hooks_ask_for_modules(monkeypatch):
    counts = _counting_forwards(monkeypatch)
    flow = nvp()
    x = torch.tensor([[0.5, -1.0], [1.0, 2.0]])
    with torch.no_grad():
        reference = flow.log_prob(x)
    assert counts == {"linear": 0, "silu": 0}  # the functional path, in-place activations
    lp = flow.log_prob(x)  # with autograd: the activation modules (backward needs inputs)
    lp.sum().backward()
    assert counts == {"linear": 0, "silu": 2}
    torch.testing.assert_close(lp.detach(), reference)
    fired = []
    handle = flow.layers[0].net.register_forward_hook(lambda m, i, o: fired.append("net"))
    flow.log_prob(x)
    handle.remove()
    handle = flow.layers[0].net.register_forward_pre_hook(lambda m, i: fired.append("pre"))
    flow.log_prob(x)
    handle.remove()
    handle = flow.layers[1].net[0].register_forward_hook(lambda m, i, o: fired.append("linear"))
    flow.log_prob(x)
    handle.remove()
    assert fired == ["net", "pre", "linear"]
    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )

    seen = []
    handle = register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        flow.log_prob(x)
    finally:
        handle.remove()
    assert seen.count("Linear") == 4
    seen.clear()
    handle = register_module_forward_pre_hook(lambda m, i: seen.append(type(m).__name__))
    try:
        flow.log_prob(x)
    finally:
        handle.remove()
    assert seen.count("Linear") == 4


def test_a_failing_compile_falls_back_to_the_eager_moves(monkeypatch):
    from ebmflow.samplers import MALA, CompileFallbackWarning

    built = []

    def broken(fn, **kwargs):
        built.append(fn)

        def call(*args, **kw):
            raise RuntimeError("boom")
        return call

    x0 = 2.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    runs = []
    for compiled in (False, True):
        monkeypatch.setattr(torch, "compile", broken if compiled else (lambda fn, **kw: fn))
        s = FlowMC(_wobbly_realnvp(), MALA(0.1), n_local=0, n_global=5, proposal_batch_size=32,
                   flow_steps=0, compile=compiled)
        g = torch.Generator().manual_seed(1)
        if compiled:
            with pytest.warns(CompileFallbackWarning) as rec:
                x = s.sample(_gm_target(), x0=x0, generator=g)
            assert s._compile_failed == "torch.compile failed: RuntimeError: boom"
            assert s._compile_failed in str(rec[0].message) and s._blocks == {}
        else:
            x = s.sample(_gm_target(), x0=x0, generator=g)
        runs.append((s, x, g))
    (s_e, x_e, g_e), (s_c, x_c, g_c) = runs
    assert len(built) == 1  # after the failure the other chunks are not compiled again
    torch.testing.assert_close(x_c, x_e)
    torch.testing.assert_close(s_c.chain_stats["global_accept"], s_e.chain_stats["global_accept"])
    assert torch.equal(g_c.get_state(), g_e.get_state())


def test_a_compiled_chunk_failing_after_running_raises(monkeypatch):
    from ebmflow.samplers import MALA

    def flaky(fn, **kwargs):
        calls = []

        def call(*args, **kw):
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("late failure")
            return fn(*args, **kw)
        return call

    monkeypatch.setattr(torch, "compile", flaky)
    s = FlowMC(_wobbly_realnvp(), MALA(0.1), n_local=0, n_global=2, proposal_batch_size=None,
               flow_steps=0, compile=True)
    x0 = torch.zeros(4, 2)
    energy = _gm_target()
    s.sample(energy, x0=x0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="late failure"):
        s.sample(energy, x0=x0, generator=torch.Generator().manual_seed(1))


def test_compiled_blocks_cache_per_energy_evict_the_oldest_and_record_noise_once(monkeypatch):
    from ebmflow.samplers import MALA, rng

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    torch.manual_seed(0)
    s = FlowMC(_wobbly_realnvp(), MALA(0.1), n_local=0, n_global=2, proposal_batch_size=None,
               flow_steps=0, compile=True)
    recordings = []
    real = s.flow.sample_and_log_prob

    def spy(n, generator=None):
        if isinstance(generator, rng.RecordingTape):
            recordings.append(n)
        return real(n, generator)

    monkeypatch.setattr(s.flow, "sample_and_log_prob", spy)
    x0 = torch.zeros(4, 2)
    energy = _gm_target()
    state = torch.get_rng_state()
    s.sample(energy, x0=x0, generator=torch.Generator().manual_seed(0))
    (key, block), = s._blocks.items()
    assert key[0] == id(energy) and key[1] == id(s.flow) and key[3] == 2 and key[-2:] == (True, True)
    assert key[2] == (("x", (4, 2), torch.float32, torch.device("cpu")),)
    assert block.spec[0] == rng.Draw("rand", (2, 4), torch.float32, torch.device("cpu"))
    s.sample(energy, x0=x0, generator=torch.Generator().manual_seed(1))
    assert s._blocks == {key: block}  # reused
    assert recordings == [8]  # the flow's draws are recorded once per size
    assert list(s._flow_specs) == [(id(s.flow), 8, torch.float32, "cpu")]
    assert torch.equal(torch.get_rng_state(), state)  # recorded on a private generator
    energies = [_gm_target() for _ in range(9)]
    for e in energies:
        s.sample(e, x0=x0, generator=torch.Generator().manual_seed(0))
    assert len(s._blocks) == 8 and {k[0] for k in s._blocks} == {id(e) for e in energies[1:]}


def test_ode_flows_are_not_compiled():
    from ebmflow.samplers import CompileFallbackWarning

    fm = FlowMC(ContinuousFlow(2, hidden=(4,)), compile=True)
    with pytest.warns(CompileFallbackWarning):
        assert fm._use_compiled(torch.zeros(2, 2)) is False
    assert fm._compile_failed == "ContinuousFlow solves an ODE (torchdiffeq), which is not compiled"


# -- second pass: defaults, duck-typed flows, devices (meta), spies on warn/generators --------


def test_flowmc_defaults_and_initial_state():
    fm = FlowMC(nvp())
    assert (fm.n_local, fm.n_global, fm.n_rounds, fm.n_chains) == (10, 10, 1, None)
    assert fm.flow_steps == 1 and fm.flow_batch_size is None and fm.flow_loss == "ml"
    assert fm.max_grad_norm == 10.0 and fm.adapt_steps is None and fm.train_updates is None
    assert fm.history == 0 and fm.train_examples is None and fm.flow_epochs is None
    assert fm.retune_local is True and fm.logq_tol == 1e-3 and fm.check_every == 25
    assert fm.init == "noise" and fm.check_finite is True and fm.proposal_batch_size == 4096
    assert fm.compile is False and fm.scheduler is None
    assert fm.chains.shape == (0,) and fm.history_states.shape == (0,)
    assert fm._hist_pos == 0 and fm._hist_len == 0 and fm._n_calls == 0 and fm._auto_moves == 0
    assert fm._flow_checked is False and fm._warned_tilt is False
    assert fm._health_ref is None and fm._best_loss == math.inf
    assert fm.chain_stats == {} and fm.compile_after == 2000
    assert fm._compile_backend == "inductor" and fm.compile_backend == "inductor"
    assert fm._blocks == {} and fm._flow_specs == {} and fm._compile_failed is None
    assert fm.n_flow_updates == 0 and fm.n_fits == 0
    assert type(fm.optimizer).__name__ == "Adam" and fm.optimizer.param_groups[0]["lr"] == 1e-3


def test_flowmc_accepts_the_smallest_valid_settings():
    fm = FlowMC(nvp(), train_updates=0)
    assert fm.train_updates == 0 and fm.frozen
    fm = FlowMC(nvp(), adapt_steps=0)
    assert fm.adapt_steps == 0 and fm.frozen
    assert FlowMC(nvp(), proposal_batch_size=1).proposal_batch_size == 1
    assert FlowMC(nvp(), compile="auto").compile == "auto"


def test_flowmc_takes_a_callable_optimizer():
    seen = []

    def make(params):
        params = list(params)
        seen.append(params)
        return torch.optim.SGD(params, lr=0.5)

    fm = FlowMC(nvp(), optimizer=make)
    assert type(fm.optimizer) is torch.optim.SGD and fm.optimizer.param_groups[0]["lr"] == 0.5
    assert [id(p) for p in seen[0]] == [id(p) for p in fm.flow.parameters()]
    assert type(FlowMC(nvp(), optimizer="adamw").optimizer) is torch.optim.AdamW


def test_compile_true_asks_the_local_kernel_to_compile_in_blocks_of_n_local_minus_one():
    from ebmflow.samplers import MALA

    def local_after(mode, n_local, **kw):
        local = MALA(0.1, **kw)
        FlowMC(nvp(), local, n_local=n_local, compile=mode)
        return local.compile, local.graph_steps

    assert local_after(True, 10) == (True, 9)
    assert local_after(True, 3) == (True, 2)
    assert local_after(True, 2) == (True, None)  # a block of one step: none set
    assert local_after(True, 17) == (True, 16)
    assert local_after(True, 18) == (True, None)  # above the largest block FlowMC sets
    assert local_after(True, 10, graph_steps=5) == (True, 5)  # the kernel's own K is kept
    assert local_after(True, 10, compile=False) == (False, None)  # told not to compile
    assert local_after(False, 10) == ("auto", None)
    assert local_after("auto", 10) == ("auto", None)


class _Gap(Flow):
    """A flow with a numerical inverse whose sampling pass is off by ``gap`` nats; records
    the (n, generator) of every sampling call."""

    numerical_inverse = True

    def __init__(self, gap, ode_steps=None, dim=2):
        super().__init__(dim)
        self.gap = gap
        self.calls = []
        if ode_steps is not None:
            self.ode_steps = ode_steps

    def log_prob(self, x):
        return torch.zeros(x.shape[0])

    def sample_and_log_prob(self, n, generator=None):
        self.calls.append((n, generator))
        return torch.zeros(n, self.dim), torch.full((n,), self.gap)


def test_check_exact_log_prob_defaults_tolerance_and_message():
    from types import SimpleNamespace

    from ebmflow.flows.flowmc import check_exact_log_prob

    assert check_exact_log_prob(nvp()) == 0.0  # an analytic inverse: nothing drawn
    assert check_exact_log_prob(SimpleNamespace()) == 0.0  # no attributes: exact, analytic
    flow = _Gap(0.5)
    g = torch.Generator()
    assert check_exact_log_prob(flow, tol=0.5, generator=g) == 0.5  # gap == tol passes
    assert flow.calls == [(256, g)]
    assert check_exact_log_prob(_Gap(2.0 ** -11)) == 2.0 ** -11  # below the default 1e-3
    with pytest.raises(ValueError) as info:
        check_exact_log_prob(_Gap(0.5, ode_steps=7))  # default tol 1e-3
    assert str(info.value) == (
        "the forward and inverse ODE solves of _Gap disagree by 0.5 nats in log q (tolerance "
        "0.001): the independence proposals would not keep the target invariant; solve more "
        "accurately, e.g. more ode_steps (now 7) or method='dopri5' with atol=rtol=1e-7, or "
        "raise FlowMC(logq_tol=...)")
    with pytest.raises(ValueError, match=r"disagree by 0.01 nats in log q \(tolerance 0.001\)"):
        check_exact_log_prob(_Gap(0.01))
    with pytest.raises(ValueError) as info:  # NaN counts as an infinite gap
        check_exact_log_prob(_Gap(float("nan")), tol=10.0)
    assert str(info.value).startswith("the forward and inverse ODE solves of _Gap disagree by "
                                      "inf nats in log q (tolerance 10): ")
    assert "more ode_steps (now ?) or" in str(info.value)
    with pytest.raises(ValueError, match="estimates the trace stochastically"):
        check_exact_log_prob(ContinuousFlow(9, hidden=(4,)))


def test_check_exact_log_prob_kind_reads_the_flows_flag():
    from types import SimpleNamespace

    from ebmflow.flows.flowmc import check_exact_log_prob_kind

    check_exact_log_prob_kind(SimpleNamespace())  # no flag: exact
    check_exact_log_prob_kind(SimpleNamespace(exact_log_prob=True))
    with pytest.raises(ValueError, match="^FlowMC needs an exact log q"):
        check_exact_log_prob_kind(SimpleNamespace(exact_log_prob=False))


def test_check_flow_uses_a_private_seeded_generator_on_the_flows_device(monkeypatch):
    import ebmflow.flows.flowmc as flowmc

    made, checks = [], []
    real = torch.Generator

    def generator(device=None):
        made.append(device)
        return real()

    def check(flow, n=256, tol=1e-3, generator=None):
        checks.append((tol, generator.initial_seed() if generator is not None else None))
        return 0.0

    monkeypatch.setattr(torch, "Generator", generator)
    monkeypatch.setattr(flowmc, "check_exact_log_prob", check)
    fm = FlowMC(nvp(), logq_tol=0.25)
    fm._check_flow()
    assert fm._flow_checked is True
    fm.flow = nvp().to("meta")
    fm._check_flow()
    fm.flow = Bare(2)  # no parameters or buffers: the CPU
    fm._check_flow()
    assert made == [torch.device("cpu"), torch.device("meta"), torch.device("cpu")]
    assert checks == [(0.25, 0), (0.25, 0), (0.25, 0)]


def test_check_flow_passes_the_samplers_tolerance():
    fm = FlowMC(_Gap(0.5), logq_tol=0.6)
    fm._check_flow()
    ((n, g),) = fm.flow.calls
    assert n == 256 and isinstance(g, torch.Generator) and g.initial_seed() == 0
    with pytest.raises(ValueError, match=r"\(tolerance 0.4\)"):
        FlowMC(_Gap(0.5), logq_tol=0.4)._check_flow()


class _QuadOn(Quad):
    """Quad with a (unused) parameter on ``device``."""

    def __init__(self, device):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, device=device))


def test_flowmc_refuses_a_flow_on_another_device_than_the_energy():
    with pytest.raises(ValueError) as info:
        FlowMC(nvp())._check_energy(_QuadOn("meta"))
    assert str(info.value) == ("the flow is on device cpu but the model is on meta; move it "
                               "first, e.g. the flow = the flow.to('meta')")
    FlowMC(nvp())._check_energy(_QuadOn("cpu"))
    FlowMC(Bare(2))._check_energy(_QuadOn("meta"))  # a flow without parameters: not checked


def _spy_warn(monkeypatch):
    calls = []

    def warn(message, category=None, stacklevel=1, **kw):
        calls.append((str(message), category, stacklevel))

    monkeypatch.setattr(warnings, "warn", warn)
    return calls


def test_flowmc_warnings_point_at_the_caller_of_update(monkeypatch):
    from types import SimpleNamespace

    line = torch.tensor([[0.0], [1.0], [2.0]])
    calls = _spy_warn(monkeypatch)
    _health(line, ref=(1.0, 1.0), best=1.0).check_health(torch.tensor(11.5))  # exploded
    _health(line, ref=(100.0, 1.0)).check_health()  # collapsed
    _health(line, ref=(1.0, 0.0199)).check_health()  # ran away
    fm = FlowMC(nvp())
    fm._warn_tilt_feedback(SimpleNamespace(flow=fm.flow))
    assert [c[2] for c in calls] == [3, 3, 3, 3]
    assert all(c[1] is RuntimeWarning for c in calls)
    assert [c[0].split(" ")[1:3] for c in calls[:3]] == [["the", "flow"], ["the", "chains"],
                                                         ["the", "chains"]]


def test_check_health_of_two_chains_checks_the_collapse():
    two = torch.tensor([[0.0], [0.01]])
    with pytest.warns(RuntimeWarning, match="collapsed"):
        _health(two, ref=(100.0, 1.0)).check_health()


def test_check_health_builds_its_zeros_on_the_chains_device():
    # on meta everything up to the one host read works: the zeros are made on the chains'
    # device (a CPU zero would fail to stack with the meta numbers first)
    for chains in (torch.zeros(1, 2, device="meta"), torch.zeros(3, 2, device="meta")):
        with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
            _health(chains).check_health()


def test_use_compiled_auto_counts_the_global_moves(monkeypatch):
    import ebmflow.flows.flowmc as flowmc

    fm = FlowMC(nvp(), n_global=10, compile="auto")
    fm.compile_after = 20
    x = torch.zeros(2, 2)
    assert fm._use_compiled(x) is False and fm._auto_moves == 10
    assert fm._use_compiled(x) is True and fm._auto_moves == 20  # 20 moves: compile now
    assert fm._use_compiled(x) is True and fm._auto_moves == 30
    fm = FlowMC(nvp(), n_global=10, compile="auto")
    fm.compile_after = 25
    assert [fm._use_compiled(x) for _ in range(3)] == [False, False, True]
    fm = FlowMC(nvp(), compile=True)
    assert fm._use_compiled(x) is True and fm._auto_moves == 0
    from ebmflow.samplers import CompileFallbackWarning

    monkeypatch.setattr(flowmc, "compile_available", lambda: (False, "no compiler here"))
    fm = FlowMC(nvp(), compile=True)
    with pytest.warns(CompileFallbackWarning) as rec:
        assert fm._use_compiled(x) is False
    assert fm._compile_failed == "no compiler here" and "no compiler here" in str(rec[0].message)


def test_sample_runs_the_rounds_asked_for_and_checks_x0_against_n():
    fm = FlowMC(nvp(), n_local=1, n_global=1, history=10, flow_steps=0)
    fm.sample(Quad(), x0=torch.zeros(3, 2), generator=torch.Generator().manual_seed(0),
              n_rounds=3)
    assert fm._hist_len == 6  # two snapshots a round
    fm.sample(Quad(), generator=torch.Generator().manual_seed(0))
    assert fm._hist_len == 8
    with pytest.raises(ValueError) as info:
        FlowMC(nvp()).sample(Quad(), 3, x0=torch.zeros(4, 2))
    assert str(info.value) == "n=3 but x0 has 4 states; pass one of them"
    with pytest.raises(ValueError) as info:
        FlowMC(nvp(3), n_chains=2).sample(Quad(3), 4)
    assert str(info.value) == ("n=4 but FlowMC keeps 2 persistent chains; pass n <= 2 or build "
                               "FlowMC(n_chains=4)")


def test_sample_subsets_the_chains_on_their_device():
    fm = FlowMC(nvp(), n_local=0, n_global=0, check_finite=False).to("meta")
    fm._flow_checked = True
    fm.chains = torch.zeros(5, 2, device="meta")
    state = torch.get_rng_state()
    assert fm.sample(Quad(), 3).shape == (3, 2)
    assert torch.equal(torch.get_rng_state(), state)  # drawn on meta, not by the CPU


def _meta_update(**kw):
    torch.manual_seed(0)
    fm = FlowMC(nvp(), check_every=0, retune_local=False, **kw).to("meta")
    fm.chains = torch.zeros(4, 2, device="meta")
    return fm


@pytest.mark.parametrize("kw", [dict(flow_epochs=1, flow_batch_size=2),
                                dict(flow_steps=2, flow_batch_size=2),
                                dict(train_examples=6)], ids=["epochs", "steps", "examples"])
def test_update_draws_its_batches_on_the_chains_device(kw):
    fm = _meta_update(**kw)
    state = torch.get_rng_state()
    out = fm.update(Quad())
    assert out["flow_loss"].device.type == "meta" and fm.n_flow_updates >= 1
    assert torch.equal(torch.get_rng_state(), state)


def test_fit_draws_its_batches_on_the_datas_device():
    flow = _Cheap().to("meta")
    state = torch.get_rng_state()
    flow.fit(torch.zeros(4, 2, device="meta"), 2, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)


def test_global_moves_on_the_chains_device():
    fm = FlowMC(_Scripted(torch.zeros(12, 2, device="meta")), n_local=0, n_global=3)
    x = torch.zeros(4, 2, device="meta")
    state = torch.get_rng_state()
    xs, acc, bad = fm._global_moves(Quad(), x, None, None)  # one chunk of three moves
    assert xs.device.type == acc.device.type == bad.device.type == "meta"
    fm.n_global = 1  # the single-move chunk
    xs, acc, bad = fm._global_moves(Quad(), x, None, None)
    assert xs.device.type == acc.device.type == "meta"
    assert torch.equal(torch.get_rng_state(), state)


class _Scripted(Flow):
    """log q = 0 everywhere; proposes fixed states, records the sizes asked for."""

    def __init__(self, proposals):
        super().__init__(proposals.shape[1])
        self.proposals = proposals
        self.sizes = []

    def log_prob(self, x):
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def sample_and_log_prob(self, n, generator=None):
        self.sizes.append(n)
        p = self.proposals
        return p[:n], torch.zeros(n, dtype=p.dtype, device=p.device)


def test_global_moves_draw_float64_uniforms_for_float64_chains():
    b, n_global = 64, 2
    x = torch.zeros(b, 1, dtype=torch.float64)
    prop = torch.full((n_global * b, 1), 1.0, dtype=torch.float64)  # E = 0.5: alpha = e^-0.5
    fm = FlowMC(_Scripted(prop), n_local=0, n_global=n_global, proposal_batch_size=None)
    g = torch.Generator().manual_seed(3)
    xs, acc, bad = fm._global_moves(Quad(1), x, None, g)
    log_u = torch.rand((n_global, b), generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64).log()
    accepted = (log_u + 0.5 < 0.0).any(0)  # from x = 0 (v = 0) to x' = 1 (v = 0.5), then stay
    torch.testing.assert_close(xs[:, 0], accepted.double(), rtol=0, atol=0)
    assert fm.flow.sizes == [n_global * b] and not bool(bad)


def test_global_moves_make_at_least_one_move_per_flow_call():
    fm = FlowMC(_Scripted(torch.zeros(12, 2)), n_local=0, n_global=3, proposal_batch_size=4)
    fm._global_moves(Quad(), torch.zeros(4, 2), None, None)
    assert fm.flow.sizes == [4, 4, 4]  # 4 // 4 = one move (four proposals) per call
    fm = FlowMC(_Scripted(torch.zeros(12, 2)), n_local=0, n_global=3, proposal_batch_size=2)
    fm._global_moves(Quad(), torch.zeros(4, 2), None, None)
    assert fm.flow.sizes == [4, 4, 4]  # fewer than one per chain: still one move per call


def test_flow_spec_records_on_the_chains_device(monkeypatch):
    made = []
    real = torch.Generator

    def generator(device=None):
        made.append(device)
        return real()

    fm = FlowMC(_Scripted(torch.zeros(8, 2)), n_local=0, n_global=1)
    monkeypatch.setattr(torch, "Generator", generator)
    assert fm._flow_spec(4, torch.zeros(4, 2, device="meta")) == []
    assert made == [torch.device("meta")]


def test_flow_matching_loss_is_the_formula():
    torch.manual_seed(0)
    flow = ContinuousFlow(2, hidden=(4,), ode_steps=2).double()
    with torch.no_grad():
        flow.velocity.net[-1].weight.normal_()
    x1 = torch.tensor([[0.5, -1.0], [1.0, 2.0], [-0.5, 0.25]], dtype=torch.float64)
    got = flow.flow_matching_loss(x1, torch.Generator().manual_seed(4)).detach()
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn((3, 2), generator=g, dtype=torch.float64)
    t = torch.rand(3, generator=g, dtype=torch.float64)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    with torch.no_grad():
        residual = flow.velocity(t, xt) - (x1 - x0)
    expected = sum(float(residual[b].pow(2).sum()) for b in range(3)) / 3
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_flow_matching_loss_draws_on_the_datas_device():
    flow = ContinuousFlow(2, hidden=(4,), ode_steps=2).to("meta")
    state = torch.get_rng_state()
    loss = flow.flow_matching_loss(torch.zeros(3, 2, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()
    assert torch.equal(torch.get_rng_state(), state)


def test_realnvp_defaults_masks_and_parameter_dtypes():
    flow = RealNVP(3)
    assert len(flow.layers) == 8 and flow.layers[0].scale_bound == 3.0
    assert type(flow.layers[0].net[1]) is torch.nn.SiLU
    assert [layer.mask.tolist() for layer in flow.layers[:3]] == [
        [1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    assert RealNVP(2, scale_bound=0.5).layers[1].scale_bound == 0.5
    f = RealNVP(2, n_layers=2, hidden=(4,), loc=1, scale=torch.tensor([2.0, 4.0], dtype=torch.float64))
    assert f.loc.dtype == torch.float32 and f.log_scale.dtype == torch.float32
    assert f.loc.tolist() == [1.0, 1.0]
    torch.testing.assert_close(f.log_scale, torch.tensor([2.0, 4.0]).log())
    f = RealNVP(2, n_layers=2, hidden=(4,), loc=torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert f.loc.dtype == torch.float32 and f.loc.tolist() == [0.5, 1.5]


def test_coupling_keeps_only_the_mask_in_its_state_dict():
    layer = RealNVP(2, n_layers=1, hidden=(4,)).layers[0]
    assert sorted(layer.state_dict()) == ["mask", "net.0.bias", "net.0.weight", "net.2.bias",
                                          "net.2.weight"]
    assert layer.free.tolist() == [0.0, 1.0] and layer.free_bound.tolist() == [0.0, 3.0]


def test_draw_with_log_prob_prefers_the_joint_then_rsample_then_sample():
    from types import SimpleNamespace

    from ebmflow.flows.zuko_adapter import _draw_with_log_prob

    calls = []

    def log_prob(x):
        return x.sum(-1)

    joint = SimpleNamespace(rsample_and_log_prob=lambda shape: ("joint", shape))
    assert _draw_with_log_prob(joint, 3) == ("joint", (3,))

    def draw(name):
        def fn(shape):
            calls.append((name, shape))
            return torch.ones(*shape, 2)
        return fn

    both = dict(rsample=draw("rsample"), sample=draw("sample"), log_prob=log_prob)
    x, lq = _draw_with_log_prob(SimpleNamespace(has_rsample=True, **both), 2)
    assert lq.tolist() == [2.0, 2.0]
    _draw_with_log_prob(SimpleNamespace(has_rsample=False, **both), 2)
    _draw_with_log_prob(SimpleNamespace(**both), 4)  # no has_rsample: sample
    assert calls == [("rsample", (2,)), ("sample", (2,)), ("sample", (4,))]


class _Custom(zuko.lazy.LazyDistribution):
    """A zuko lazy distribution returning ``make()``."""

    def __init__(self, make):
        super().__init__()
        self.make = make
        self.p = torch.nn.Parameter(torch.zeros(2))

    def forward(self, c=None):
        return self.make(self.p)


def _normal(p):
    return torch.distributions.Independent(torch.distributions.Normal(p, torch.ones(2)), 1)


class _BaseOnly(torch.distributions.Distribution):
    """A distribution with a Gaussian ``base`` but no transform."""

    arg_constraints = {}

    def __init__(self, p):
        self.base = _normal(p)
        super().__init__(event_shape=(2,), validate_args=False)

    def log_prob(self, x):
        return self.base.log_prob(x)

    def sample(self, shape=()):
        return self.base.sample(shape)


def _uniform_flow(p):
    uniform = torch.distributions.Independent(
        torch.distributions.Uniform(torch.zeros(2), torch.ones(2)), 1)
    return zuko.distributions.NormalizingFlow(zuko.transforms.MonotonicAffineTransform(p, p), uniform)


def test_zuko_distributions_without_a_transform_or_gaussian_base():
    plain = ZukoFlow(_Custom(_normal))  # neither transform nor base
    with pytest.raises(ValueError) as info:
        plain.forward(torch.zeros(1, 2))
    assert str(info.value) == ("the zuko distribution Independent is not a NormalizingFlow (no "
                               "transform/base): only log_prob and sample_and_log_prob are "
                               "available")
    with pytest.raises(TypeError) as info:
        plain.base_sample(2)
    assert str(info.value) == ("Independent has no Gaussian base: it cannot be sampled from "
                               "standard normal noise")
    torch.manual_seed(0)
    x, lq = plain.sample_and_log_prob(3)
    assert x.shape == (3, 2)
    torch.testing.assert_close(lq, _normal(torch.zeros(2)).log_prob(x))
    with pytest.raises(TypeError, match="^_BaseOnly has no Gaussian base"):
        ZukoFlow(_Custom(_BaseOnly)).base_sample(2)
    uniform = ZukoFlow(_Custom(_uniform_flow))
    with pytest.raises(TypeError, match="^NormalizingFlow has no Gaussian base"):
        uniform.base_sample(2)
    with pytest.raises(TypeError) as info:
        uniform.sample_from_base(torch.zeros(2, 2))
    assert str(info.value) == "sample_from_base needs a Gaussian base, this flow's is Independent"


def test_zuko_sampling_without_gaussian_noise_seeds_the_global_rng_from_the_generator():
    torch.manual_seed(0)
    flow = ZukoFlow(zuko.mixtures.GMM(2, components=2))
    x, lq = flow.sample_and_log_prob(5, torch.Generator().manual_seed(7))
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(7)))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        dist = flow.flow()
        expected = dist.sample((5,))
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    torch.testing.assert_close(lq, flow.flow().log_prob(expected))


def test_pickling_leaves_out_the_compiled_moves():
    import pickle

    fm = FlowMC(nvp(), n_local=1, n_global=1)
    fm._blocks = {"key": lambda: None}  # stands in for a compiled chunk (not picklable)
    fm._flow_specs = {"key": [lambda: None]}
    state = fm.__getstate__()
    assert state["_blocks"] == {} and state["_flow_specs"] == {}
    assert state["n_local"] == 1 and "key" in fm._blocks  # the sampler itself keeps its cache
    copy = pickle.loads(pickle.dumps(fm))
    assert copy._blocks == {} and copy._flow_specs == {} and copy.n_global == 1


def test_compiled_global_moves_of_float64_chains_are_the_eager_moves(monkeypatch):
    from ebmflow.samplers import MALA

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    x0 = 2.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    runs = []
    for compiled in (False, True):
        s = FlowMC(_wobbly_realnvp().double(), MALA(0.1), n_local=0, n_global=3,
                   proposal_batch_size=None, flow_steps=0, compile=compiled)
        x = s.sample(Quad(), x0=x0, generator=torch.Generator().manual_seed(1))
        runs.append((s, x))
    (s_e, x_e), (s_c, x_c) = runs
    assert s_c._compile_failed is None and len(s_c._blocks) == 1
    assert x_c.dtype == torch.float64
    torch.testing.assert_close(x_c, x_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_c.chain_stats["global_accept"], s_e.chain_stats["global_accept"])
    assert 0.0 < float(s_e.stats["global_accept"]) < 1.0
