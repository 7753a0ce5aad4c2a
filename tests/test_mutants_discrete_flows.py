"""Tests written from surviving mutants of ``ebmflow.discrete_flows`` (``tools/mutation.py``).

Each test checks exact values (hand-computed or from the defining formula), exact error
messages or exact warnings, so that a changed constant, comparison, argument or message in
the package makes it fail.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from ebmflow.discrete_flows import (
    BackAndForth,
    BootstrapFlow,
    CTMCSolver,
    DiscreteFlowSampler,
    FactorizedProposal,
    FlowNegatives,
    LinearSchedule,
    LowESSWarning,
    MixturePath,
    MLPVelocity,
    PolynomialSchedule,
    VelocityModel,
    importance_weights,
    posterior_loss,
    to_tokens,
    velocity_regression_loss,
)
from ebmflow.discrete_flows.path import check_time
from ebmflow.discrete_flows.sampler import _check_weights
from ebmflow.energy import EnergyModel
from ebmflow.spaces import Binary, Categorical, Continuous


class Lin(EnergyModel):
    """E(x) = sum of the entries (bits or one-hot), for any discrete space."""

    def energy(self, x):
        return x.reshape(x.shape[0], -1).float().sum(-1)


def _flow(dim=3, **kw):
    torch.manual_seed(0)
    return DiscreteFlowSampler(MLPVelocity(dim, 2, hidden=(4,)), **kw)


PATH = MixturePath(2)
FLOW = _flow(path=PATH)
L2 = torch.zeros(2, 3, dtype=torch.long)

ERRORS = {
    "poly": lambda: PolynomialSchedule(0.5),
    "time_dev": lambda: check_time(torch.zeros(2, device="meta"), 2, torch.device("cpu")),
    "time_shape": lambda: check_time(torch.zeros(3), 2, torch.device("cpu")),
    "time_range": lambda: check_time(torch.tensor([0.5, 1.5]), 2, torch.device("cpu")),
    "path_S": lambda: MixturePath(1),
    "path_src": lambda: MixturePath(2, "gauss"),
    "path_sched": lambda: MixturePath(2, schedule="lin"),
    "tok_dtype": lambda: PATH.check_tokens(torch.zeros(2, 3)),
    "tok_list": lambda: PATH.check_tokens([1]),
    "tok_mask": lambda: PATH.check_tokens(torch.tensor([[0, 3]]), allow_mask=True),
    "tok_nomask": lambda: PATH.check_tokens(torch.tensor([[0, 2]])),
    "tok_uni": lambda: MixturePath(2, "uniform").check_tokens(torch.tensor([[0, 2]]), allow_mask=True),
    "solver_both": lambda: CTMCSolver(PATH, 0.1, step_size=0.1),
    "solver_path": lambda: CTMCSolver("p"),
    "solver_dt": lambda: CTMCSolver(PATH, 0.0),
    "solver_jump": lambda: CTMCSolver(PATH, jump="euler"),
    "solver_compile": lambda: CTMCSolver(PATH, compile="yes"),
    "solver_t0": lambda: CTMCSolver(PATH).sample(lambda x, t: None, torch.full((1, 3), 2), t0=1.0),
    "solver_traj": lambda: CTMCSolver(PATH, 0.5).trajectory_log_prob(lambda x, t: None, [torch.zeros(1, 3, dtype=torch.long)]),
    "loss_xt": lambda: velocity_regression_loss(torch.zeros(2, 3, 2), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), PATH),
    "loss_out": lambda: velocity_regression_loss(torch.zeros(2, 3, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), PATH),
    "loss_post": lambda: posterior_loss(torch.zeros(2, 3, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), PATH),
    "loss_t": lambda: velocity_regression_loss(torch.zeros(2, 3, 2), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.zeros(3), PATH),
    "loss_w": lambda: velocity_regression_loss(torch.zeros(2, 3, 2), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), PATH, torch.ones(3)),
    "model_dim": lambda: MLPVelocity(0),
    "model_S": lambda: MLPVelocity(2, 1),
    "model_hidden": lambda: MLPVelocity(2, 2, hidden=()),
    "model_fwd": lambda: VelocityModel(2, 2)(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1)),
    "iw_shape": lambda: importance_weights(torch.zeros(2), torch.zeros(3)),
    "iw_temp": lambda: importance_weights(torch.zeros(2), torch.zeros(2), 0.0),
    "prop_shape": lambda: FactorizedProposal(torch.ones(3) / 3),
    "prop_sum": lambda: FactorizedProposal(torch.tensor([[0.5, 0.6]])),
    "prop_fit": lambda: FactorizedProposal.fit(torch.zeros(2, 3), 2),
    "prop_smooth": lambda: FactorizedProposal.fit(torch.zeros(2, 3, dtype=torch.long), 2, -1.0),
    "prop_logp": lambda: FactorizedProposal.uniform(3).log_prob(torch.zeros(2, 4, dtype=torch.long)),
    "to_tokens": lambda: to_tokens(torch.zeros(2, 3), Continuous(3)),
    "dfs_model": lambda: DiscreteFlowSampler("m"),
    "dfs_obj": lambda: DiscreteFlowSampler(MLPVelocity(3, hidden=(4,)), objective="ce"),
    "dfs_S": lambda: DiscreteFlowSampler(MLPVelocity(3, hidden=(4,)), MixturePath(3)),
    "dfs_solver": lambda: DiscreteFlowSampler(MLPVelocity(3, hidden=(4,)), PATH, CTMCSolver(MixturePath(2))),
    "dfs_fit": lambda: DiscreteFlowSampler(MLPVelocity(3, hidden=(4,)), fit_to="both"),
    "dfs_sbr_post": lambda: DiscreteFlowSampler(MLPVelocity(3, hidden=(4,)), objective="posterior", scale_by_rate=True),
    "dfs_sbr_own": lambda: DiscreteFlowSampler(MLPVelocity(3, hidden=(4,), schedule=LinearSchedule()), scale_by_rate=True),
    "dfs_check_every": lambda: DiscreteFlowSampler(MLPVelocity(3, hidden=(4,)), check_every=0),
    "dfs_temp": lambda: DiscreteFlowSampler(MLPVelocity(3, hidden=(4,)), temperature=0.0),
    "dfs_batch": lambda: DiscreteFlowSampler(MLPVelocity(3, hidden=(4,)), batch_size=0),
    "dfs_upc": lambda: DiscreteFlowSampler(MLPVelocity(3, hidden=(4,)), updates_per_call=0),
    "dfs_energy": lambda: FLOW.sample(Lin(Binary(4)), 2),
    "dfs_t0": lambda: FLOW.sample_tokens(2, t0=0.5),
    "dfs_n_x0": lambda: FLOW.sample(Lin(Binary(3)), 3, x0=torch.zeros(2, 3)),
    "dfs_none": lambda: FLOW.sample(Lin(Binary(3))),
    "cw_nan": lambda: _check_weights(torch.tensor([0.0, float("nan")]), torch.zeros(2)),
    "cw_ninf": lambda: _check_weights(torch.tensor([0.0, float("-inf")]), torch.zeros(2)),
    "cw_support": lambda: _check_weights(torch.tensor([0.0, 1.5]), torch.tensor([0.0, float("-inf")])),
    "cw_all": lambda: _check_weights(torch.tensor([float("inf"), float("inf")]), torch.zeros(2)),
    "rec_flow": lambda: FlowNegatives("f"),
    "rec_k": lambda: FlowNegatives(FLOW, k=0),
    "rec_mcmc": lambda: BootstrapFlow(FLOW, mcmc="m"),
    "rec_nsteps": lambda: BootstrapFlow(FLOW, n_steps=-1),
    "rec_mask": lambda: BackAndForth(DiscreteFlowSampler(MLPVelocity(3, hidden=(4,)), MixturePath(2, "uniform"))),
    "rec_tstar": lambda: BackAndForth(FLOW, t_star=1.0),
    "rec_data": lambda: BackAndForth(FLOW).update(Lin(Binary(3))),    "time_range_first": lambda: check_time(torch.tensor([0.0, 1.0, -0.5]), 3, torch.device("cpu")),
    "time_nan": lambda: check_time(torch.tensor([0.5, float("nan")]), 2, torch.device("cpu")),
    "solver_x_init": lambda: CTMCSolver(PATH).sample(lambda x, t: None, torch.full((1, 3), 3)),
    "loss_post_w": lambda: posterior_loss(torch.zeros(2, 3, 2), L2, L2, torch.zeros(2), PATH, torch.ones(3)),
    "prop_logp_2d": lambda: FactorizedProposal.uniform(3).log_prob(torch.zeros(4, 2, dtype=torch.long)),
    "prop_neg": lambda: FactorizedProposal(torch.tensor([[1.5, -0.5]])),
    "rec_nsteps_float": lambda: BootstrapFlow(FLOW, n_steps=1.5),
    "rec_k_float": lambda: FlowNegatives(FLOW, k=1.0),
    "rec_tstar_0": lambda: BackAndForth(FLOW, t_star=0.0),
    "bs_meta": lambda: BootstrapFlow(FLOW).update(Lin(Binary(3)), torch.zeros(2, 3, device="meta")),
    "bs_bad": lambda: BootstrapFlow(FLOW).update(Lin(Binary(3)), torch.full((2, 3), 2.0)),
    "bf_meta": lambda: BackAndForth(FLOW).update(Lin(Binary(3)), torch.zeros(2, 3, device="meta")),
    "bf_bad": lambda: BackAndForth(FLOW).update(Lin(Binary(3)), torch.full((2, 3), 2.0)),
    "bf_x0_bad": lambda: BackAndForth(FLOW).sample(Lin(Binary(3)), x0=torch.full((2, 3), 2.0)),
    "bf_x0_meta": lambda: BackAndForth(FLOW).sample(Lin(Binary(3)), x0=torch.zeros(2, 3, device="meta")),
    "dfs_upd_bad": lambda: _flow(fit_to="data").update(Lin(Binary(3)), torch.full((2, 3), 2.0)),
    "dfs_upd_meta": lambda: _flow(fit_to="data").update(Lin(Binary(3)), torch.zeros(2, 3, device="meta")),
    "dfs_x0_bad": lambda: FLOW.sample(Lin(Binary(3)), x0=torch.full((2, 3), 2.0)),
    "dfs_x0_meta": lambda: FLOW.sample(Lin(Binary(3)), x0=torch.zeros(2, 3, device="meta")),
    "dfs_check_every_float": lambda: _flow(check_every=1.5),
    "model_S_float": lambda: MLPVelocity(2, 2.5),
    "path_x1": lambda: PATH.sample(torch.tensor([[0, 5]]), 0.5),
    "prop_one_class": lambda: FactorizedProposal(torch.ones(2, 1)),
    "solver_dt_bool": lambda: CTMCSolver(PATH, True),
}

MESSAGES = {
    'poly': (ValueError, "exponent must be a finite number >= 1, got 0.5: for n < 1 the rate kappa'(t) = n t^(n-1) is infinite at t = 0"),
    'time_dev': (ValueError, 't is on meta but the states are on cpu; move it first'),
    'time_shape': (ValueError, 't must be a scalar or have shape (B,)=(2,), got (3,)'),
    'time_range': (ValueError, 't must lie in [0, 1], got 1.5; times run from source 0 to data 1'),
    'path_S': (ValueError, 'num_classes must be an int >= 2, got 1'),
    'path_src': (ValueError, "source must be one of ('mask', 'uniform'), got 'gauss'"),
    'path_sched': (ValueError, 'schedule must be a Schedule (LinearSchedule, PolynomialSchedule), got str'),
    'tok_dtype': (ValueError, 'x must be a long (B, D) tensor of tokens, got torch.float32 (2, 3)'),
    'tok_list': (ValueError, 'x must be a long (B, D) tensor of tokens, got list'),
    'tok_mask': (ValueError, 'x has a token 3 outside the vocabulary [0, 3) (MASK included); data tokens are 0..1'),
    'tok_nomask': (ValueError, 'x has a token 2 outside the vocabulary [0, 2); data tokens are 0..1'),
    'tok_uni': (ValueError, 'x has a token 2 outside the vocabulary [0, 2); data tokens are 0..1'),
    'solver_both': (ValueError, 'pass dt only (step_size is its deprecated name)'),
    'solver_path': (ValueError, 'path must be a MixturePath, got str'),
    'solver_dt': (ValueError, 'dt must be a finite float > 0, got 0.0; e.g. 0.05'),
    'solver_jump': (ValueError, 'jump must be one of (\'exact\', \'exponential\', \'linear\'), got \'euler\'; "exact" is the default, "linear" the first-order Euler step'),
    'solver_compile': (ValueError, "compile must be True or False, got 'yes'"),
    'solver_t0': (ValueError, 't0 must be a float in [0, 1), got 1.0'),
    'solver_traj': (ValueError, 'trajectory has 1 states but the grid from t0=0.0 with step dt=0.5 has 3 times'),
    'loss_xt': (ValueError, 'x_t has shape (2, 4) but x1 has (2, 3); they must match'),
    'loss_out': (ValueError, 'velocity has shape (2, 3, 3); expected (B, D, S) = (2, 3, 2)'),
    'loss_post': (ValueError, 'logits has shape (2, 3, 3); expected (B, D, S) = (2, 3, 2)'),
    'loss_t': (ValueError, 't must have shape (B,)=(2,), got (3,)'),
    'loss_w': (ValueError, 'weights must have shape (B,)=(2,), got (3,)'),
    'model_dim': (ValueError, 'dim must be a positive int, got 0'),
    'model_S': (ValueError, 'num_classes must be an int >= 2, got 1'),
    'model_hidden': (ValueError, 'hidden must be a non-empty sequence of positive widths, got ()'),
    'model_fwd': (NotImplementedError, 'VelocityModel must implement forward(x_t, t)'),
    'iw_shape': (ValueError, 'energy_values and log_q must both have shape (B,) with B >= 1, got energy_values (2,) and log_q (3,)'),
    'iw_temp': (ValueError, 'temperature must be a positive finite float, got 0.0'),
    'prop_shape': (ValueError, 'probs must have shape (D, S) with S >= 2, got (3,)'),
    'prop_sum': (ValueError, 'probs must be non-negative with rows summing to 1'),
    'prop_fit': (ValueError, 'x must be long (N, D) tokens, got torch.float32 (2, 3)'),
    'prop_smooth': (ValueError, 'smoothing must be >= 0, got -1.0'),
    'prop_logp': (ValueError, 'x must be long (n, 3) tokens, got shape (2, 4)'),
    'to_tokens': (ValueError, 'discrete flows need a Binary or Categorical space, got Continuous(3)'),
    'dfs_model': (ValueError, 'model must be a VelocityModel (e.g. MLPVelocity), got str'),
    'dfs_obj': (ValueError, "objective must be one of ('velocity', 'posterior'), got 'ce'"),
    'dfs_S': (ValueError, 'path has 3 classes but the model 2; make them equal'),
    'dfs_solver': (ValueError, 'solver must be built on the same path object: CTMCSolver(path, h)'),
    'dfs_fit': (ValueError, 'fit_to must be one of (\'energy\', \'data\'), got \'both\': "energy" trains the flow as a sampler of the energy, "data" on the data batches given to update'),
    'dfs_sbr_post': (ValueError, "scale_by_rate applies to objective='velocity' only (posterior logits are turned into a velocity by the path); pass scale_by_rate=False"),
    'dfs_sbr_own': (ValueError, "the model already multiplies its output by its schedule's rate; pass scale_by_rate=False (or build the model without schedule=)"),
    'dfs_check_every': (ValueError, 'check_every must be a positive int, got 0'),
    'dfs_temp': (ValueError, 'temperature must be > 0, got 0.0'),
    'dfs_batch': (ValueError, 'batch_size must be a positive int, got 0'),
    'dfs_upc': (ValueError, 'updates_per_call must be a positive int, got 0'),
    'dfs_energy': (ValueError, "DiscreteFlowSampler over 3 coordinates with 2 classes cannot sample Binary(4); build the model with the energy's dim and num_classes (Binary: 2)"),
    'dfs_t0': (ValueError, 't0=0.5 > 0 needs states to re-noise; pass x1= (or x0= to sample)'),
    'dfs_n_x0': (ValueError, 'n=3 but x0 has 2 states; pass one of them'),
    'dfs_none': (ValueError, 'pass n (number of states) or x0 (states to re-noise)'),
    'cw_nan': (ValueError, 'the energy returned NaN or -inf on proposal states; check the energy model'),
    'cw_ninf': (ValueError, 'the energy returned NaN or -inf on proposal states; check the energy model'),
    'cw_support': (ValueError, "the proposal's log q is -inf at a state it sampled (index 1) where the energy is finite (1.5); importance weights are undefined. Give the proposal full support (e.g. FactorizedProposal.fit(..., smoothing=1.0))"),
    'cw_all': (ValueError, 'every importance log-weight is -inf (all energies +inf); check the energy'),
    'rec_flow': (ValueError, 'flow must be a DiscreteFlowSampler, got str'),
    'rec_k': (ValueError, 'k must be a positive int, got 0'),
    'rec_mcmc': (ValueError, 'mcmc must be an MCMCSampler, got str'),
    'rec_nsteps': (ValueError, 'n_steps must be a non-negative int, got -1'),
    'rec_mask': (ValueError, "BackAndForth needs the mask source (MixturePath(S, 'mask')): its backward process is analytic; the uniform source would need a learned backward velocity"),
    'rec_tstar': (ValueError, 't_star must lie in (0, 1), got 1.0'),
    'rec_data': (ValueError, 'BackAndForth.update needs a data batch to send back and forth'),
    'time_range_first': (ValueError, 't must lie in [0, 1], got -0.5; times run from source 0 to data 1'),
    'time_nan': (ValueError, 't must lie in [0, 1], got nan; times run from source 0 to data 1'),
    'solver_x_init': (ValueError, 'x_init has a token 3 outside the vocabulary [0, 3) (MASK included); data tokens are 0..1'),
    'loss_post_w': (ValueError, 'weights must have shape (B,)=(2,), got (3,)'),
    'prop_logp_2d': (ValueError, 'x must be long (n, 3) tokens, got shape (4, 2)'),
    'prop_neg': (ValueError, 'probs must be non-negative with rows summing to 1'),
    'rec_nsteps_float': (ValueError, 'n_steps must be a non-negative int, got 1.5'),
    'rec_k_float': (ValueError, 'k must be a positive int, got 1.0'),
    'rec_tstar_0': (ValueError, 't_star must lie in (0, 1), got 0.0'),
    'bs_meta': (ValueError, "data is on device meta but the model is on cpu; move it first, e.g. data = data.to('cpu')"),
    'bs_bad': (ValueError, 'data has a value 2.0 outside {0, 1} for Binary(3); binarise it first, e.g. (data > 0.5).float()'),
    'bf_meta': (ValueError, "data is on device meta but the model is on cpu; move it first, e.g. data = data.to('cpu')"),
    'bf_bad': (ValueError, 'data has a value 2.0 outside {0, 1} for Binary(3); binarise it first, e.g. (data > 0.5).float()'),
    'bf_x0_bad': (ValueError, 'x0 has a value 2.0 outside {0, 1} for Binary(3); binarise it first, e.g. (x0 > 0.5).float()'),
    'bf_x0_meta': (ValueError, "x0 is on device meta but the model is on cpu; move it first, e.g. x0 = x0.to('cpu')"),
    'dfs_upd_bad': (ValueError, 'data has a value 2.0 outside {0, 1} for Binary(3); binarise it first, e.g. (data > 0.5).float()'),
    'dfs_upd_meta': (ValueError, "data is on device meta but the model is on cpu; move it first, e.g. data = data.to('cpu')"),
    'dfs_x0_bad': (ValueError, 'x0 has a value 2.0 outside {0, 1} for Binary(3); binarise it first, e.g. (x0 > 0.5).float()'),
    'dfs_x0_meta': (ValueError, "x0 is on device meta but the model is on cpu; move it first, e.g. x0 = x0.to('cpu')"),
    'dfs_check_every_float': (ValueError, 'check_every must be a positive int, got 1.5'),
    'model_S_float': (ValueError, 'num_classes must be an int >= 2, got 2.5'),
    'path_x1': (ValueError, 'x1 has a token 5 outside the vocabulary [0, 2); data tokens are 0..1'),
    'prop_one_class': (ValueError, 'probs must have shape (D, S) with S >= 2, got (2, 1)'),
    'solver_dt_bool': (ValueError, 'dt must be a finite float > 0, got True; e.g. 0.05'),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_messages_are_exact(case):
    kind, message = MESSAGES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(kind) as info:
            ERRORS[case]()
    assert str(info.value) == message


def test_schedule_values_and_rates():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    lin = LinearSchedule()
    torch.testing.assert_close(lin.kappa(t), t, rtol=0, atol=0)
    torch.testing.assert_close(lin.d_kappa(t), torch.ones_like(t), rtol=0, atol=0)
    torch.testing.assert_close(lin.rate(t), torch.tensor([1.0, 4 / 3, 2.0, 1e6], dtype=torch.float64))
    cube = PolynomialSchedule(3)
    torch.testing.assert_close(cube.kappa(t), t**3, rtol=0, atol=0)
    torch.testing.assert_close(cube.d_kappa(t), 3 * t**2, rtol=0, atol=0)
    torch.testing.assert_close(cube.rate(t, eps=0.5)[-1], torch.tensor(6.0, dtype=torch.float64))
    assert repr(cube) == "PolynomialSchedule(exponent=3)"
    assert repr(lin) == "LinearSchedule()"
    torch.testing.assert_close(PolynomialSchedule(1).d_kappa(t), torch.ones_like(t), rtol=0, atol=0)
    assert PolynomialSchedule().exponent == 2.0


@pytest.mark.parametrize("bad", [0.5, float("inf"), float("nan")])
def test_polynomial_schedule_refuses_bad_exponents(bad):
    with pytest.raises(ValueError, match=r"^exponent must be a finite number >= 1, got"):
        PolynomialSchedule(bad)


def _points_outside_ebmflow(record):
    """The warning names a frame outside the ebmflow package (stacklevel=2: the caller). Under
    mutmut the caller of a mutated function is mutmut's trampoline, still outside ebmflow,
    while stacklevel 1 or 3 names a frame inside the (mutated) package."""
    import ebmflow

    package = Path(ebmflow.__file__).resolve().parent
    assert not Path(record.filename).resolve().is_relative_to(package), record.filename
    if "MUTANT_UNDER_TEST" not in os.environ:  # no trampoline: the caller is this file
        assert record.filename == __file__


def test_deprecated_names_warn_with_their_replacement():
    with pytest.warns(DeprecationWarning) as rec:
        solver = CTMCSolver(PATH, step_size=0.25)
    assert str(rec[0].message) == (
        "CTMCSolver(step_size=...) is deprecated and will be removed in the next release; use "
        "CTMCSolver(path, dt=...) (the time step of the grid)")
    _points_outside_ebmflow(rec[0])
    assert solver.dt == 0.25
    with pytest.warns(DeprecationWarning) as rec:
        assert solver.step_size == 0.25
    assert str(rec[0].message) == "CTMCSolver.step_size is deprecated; use CTMCSolver.dt"
    _points_outside_ebmflow(rec[0])
    from ebmflow.discrete_flows import effective_sample_size

    with pytest.warns(DeprecationWarning) as rec:
        ess = effective_sample_size(torch.tensor([0.0, math.log(3.0)]))
    assert str(rec[0].message) == (
        "ebmflow.discrete_flows.effective_sample_size is deprecated and will be removed in the "
        "next release; use ebmflow.metrics.effective_sample_size(log_weights, check=False)")
    _points_outside_ebmflow(rec[0])
    torch.testing.assert_close(ess, torch.tensor(16.0 / 10.0))


@pytest.mark.parametrize(("steps", "n_k_blocks"), [(7, (6, 5, 1)), (20, (19, 8, 2)), (3, (2, 1, 1)),
                                                  (2, None)])
def test_compiled_blocks_give_the_eager_samples(monkeypatch, steps, n_k_blocks):
    """compile=True with ``torch.compile`` replaced by the identity (the block's own logic,
    without dynamo: ``tests/test_ctmc_compiled.py`` compiles for real): 7 steps = 1 eager +
    1 block of 5 + the eager last step (20 steps: 1 + 2 blocks of 8 + 2 eager + the last), the
    eager samples for the same generator."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    out = []
    for compile in (False, True):
        torch.manual_seed(0)
        path = MixturePath(3, "mask")
        solver = CTMCSolver(path, dt=1 / steps, compile=compile)
        model = MLPVelocity(4, 3, hidden=(8,), schedule=path.schedule)
        with torch.no_grad():
            for p in model.net[-1].parameters():
                p.normal_(0, 1)
        flow = DiscreteFlowSampler(model, path, solver=solver)
        g = torch.Generator().manual_seed(3)
        out.append([flow.sample_tokens(32, generator=g).x for _ in range(2)])
        assert (solver.compile_seconds is not None) == (compile and n_k_blocks is not None)
        if compile and n_k_blocks is not None:
            n, k, blocks = n_k_blocks
            assert solver.compile_seconds > 0
            assert len(solver._blocks) == 1
            (key, block), = solver._blocks.items()
            assert block.k == k and key[-2:] == (n, k)
            assert solver._sample_compiled(flow.velocity, path.sample_source(2, 4), [
                j / steps for j in range(steps + 1)], None)[1] == 1 + blocks * k
    for a, b in zip(*out):
        assert torch.equal(a, b)
    assert not torch.equal(out[0][0], out[0][1])
    assert (out[0][0] < 3).all()


def _same(a, b):
    """Equal nested dicts / tuples / lists of tensors."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), (a, b)
    else:
        assert a == b


def _under_two_global_seeds(make, act):
    """``act(make(), generator)`` twice, with different global seeds: equal when every draw
    comes from the generator."""
    out = []
    for seed in (1, 2):
        obj = make()
        torch.manual_seed(seed)
        out.append(act(obj, torch.Generator().manual_seed(5)))
    _same(*out)
    return out[0]


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_recipes_and_renoise_draw_only_from_the_generator():
    energy = Lin(Binary(3))
    data = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])

    def flow_negatives(rec, g):
        stats = rec.update(energy, data, generator=g)
        return stats, _params(rec.flow.model)

    _under_two_global_seeds(lambda: FlowNegatives(_flow(batch_size=8), k=2), flow_negatives)

    def bootstrap(rec, g):
        first = rec.update(energy, data, generator=g)  # nothing kept yet: a step on the data
        x = rec.sample(energy, 4, generator=g)
        second = rec.update(energy, None, generator=g)
        return first, x, second, _params(rec.flow.model)

    _under_two_global_seeds(lambda: BootstrapFlow(_flow(), n_steps=2), bootstrap)

    def back_and_forth(rec, g):
        stats = rec.update(energy, data, generator=g)
        x = rec.sample(energy, x0=data, generator=g)
        return stats, x, _params(rec.flow.model)

    _under_two_global_seeds(lambda: BackAndForth(_flow(), t_star=0.3), back_and_forth)

    x1 = torch.zeros(64, 3, dtype=torch.long)
    renoised = _under_two_global_seeds(lambda: _flow(), lambda f, g: f.renoise(x1, 0.5, g))
    assert 0 < int((renoised == PATH.mask_token).sum()) < renoised.numel()
    assert _flow().renoise(torch.zeros(8, 3, dtype=torch.long), 1.0).eq(0).all()


def test_ebm_step_draws_from_the_generator_and_clears_gradients():
    from ebmflow.discrete_flows import ebm_step
    from ebmflow.losses import ContrastiveDivergence

    class Weighted(EnergyModel):
        def __init__(self):
            super().__init__(Binary(3))
            self.w = torch.nn.Parameter(torch.tensor([0.5, -0.25, 1.0]))
            self.unused = torch.nn.Parameter(torch.zeros(()))

        def energy(self, x):
            return (x * self.w).sum(-1)

    data = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])

    def make():
        torch.manual_seed(0)
        energy = Weighted()
        return energy, FlowNegatives(_flow(batch_size=8)), torch.optim.SGD(energy.parameters(), lr=0.1)

    def act(objs, g):
        energy, sampler, opt = objs
        energy.unused.grad = torch.ones(())
        stats = ebm_step(energy, ContrastiveDivergence(), sampler, data, opt, generator=g)
        assert energy.unused.grad is None  # zero_grad(set_to_none=True)
        return stats, _params(energy), _params(sampler.flow.model)

    _under_two_global_seeds(make, act)


def test_recipe_defaults_and_stats():
    assert FlowNegatives(FLOW).k == 1
    boot = BootstrapFlow(FLOW)
    assert boot.n_steps == 10 and boot.mcmc.metropolis is True
    assert BackAndForth(FLOW).t_star == 0.5
    energy = Lin(Binary(3))
    # before any sample and without data, update does nothing and returns no stats
    fresh = BootstrapFlow(_flow(), n_steps=1)
    before = _params(fresh.flow.model)
    assert fresh.update(energy, None) == {} and fresh.stats == {}
    _same(before, _params(fresh.flow.model))
    # with data it takes one step on the data
    stats = fresh.update(energy, torch.ones(2, 3))
    assert set(stats) == {"flow_loss"}
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(fresh.flow.model)))
    # sample keeps the MCMC stats, update adds the weight stats to them
    fresh.sample(energy, 4, generator=torch.Generator().manual_seed(0))
    assert set(fresh.stats) == {f"mcmc_{k}" for k in fresh.mcmc.stats}
    assert "mcmc_accept_rate" in fresh.stats
    stats = fresh.update(energy, None)
    assert set(stats) == {"flow_loss", "ess", "ess_fraction", "weight_max", "log_weight_std"}
    assert set(fresh.stats) == set(stats) | {f"mcmc_{k}" for k in fresh.mcmc.stats}


def test_bootstrap_reweights_kept_states_by_the_energy_change():
    """update after sample: log w = -E_new(x) + E_old(x), self-normalised (mean 1)."""
    energy = Lin(Binary(3))
    boot = BootstrapFlow(_flow(), n_steps=0)
    x = boot.sample(energy, 6, generator=torch.Generator().manual_seed(1))
    e_old = energy(x)
    torch.testing.assert_close(boot._kept[1], e_old)
    new = Lin(Binary(3))
    new.energy = lambda z: 2.0 * z.sum(-1)
    stats = boot.update(new, None)
    w = torch.softmax(-(2.0 * x.sum(-1) - e_old), 0)
    torch.testing.assert_close(stats["ess"], 1 / w.pow(2).sum())
    torch.testing.assert_close(stats["weight_max"], w.max())


def test_is_masked_and_active():
    x = torch.tensor([[0, 2, 1], [2, 2, 0]])
    torch.testing.assert_close(PATH.is_masked(x), x == 2)
    torch.testing.assert_close(PATH.active(x), x == 2)
    uniform = MixturePath(3, "uniform")
    assert uniform.is_masked(x).dtype == torch.bool and not uniform.is_masked(x).any()
    assert uniform.is_masked(x).shape == x.shape
    assert uniform.active(x).dtype == torch.bool and uniform.active(x).all()


def test_posterior_velocity_casts_the_rate_to_the_logits_dtype():
    """The rate kappa'/(1 - kappa) is cast to the logits' dtype: rounded to bfloat16 here."""
    logits = torch.zeros(1, 2, 2, dtype=torch.bfloat16)
    x_t = torch.tensor([[2, 0]])
    u = PATH.posterior_to_velocity(logits, x_t, 0.3)
    rate = torch.tensor(1 / 0.7).to(torch.bfloat16).float()
    assert rate != torch.tensor(1 / 0.7)
    torch.testing.assert_close(u, rate * torch.tensor([[[0.5, 0.5], [-0.5, 0.5]]]), rtol=0, atol=0)


def test_check_time_puts_a_float_on_the_states_device():
    t = check_time(0.25, 3, torch.device("meta"))
    assert t.device.type == "meta" and t.shape == (3,) and t.dtype == torch.float32
    torch.testing.assert_close(check_time(0.0, 2, torch.device("cpu")), torch.zeros(2))
    torch.testing.assert_close(check_time(torch.tensor([0.0, 1.0]), 2, torch.device("cpu")),
                               torch.tensor([0.0, 1.0]))


def test_to_tokens_of_categorical_states():
    space = Categorical(2, 3)
    tokens = torch.tensor([[2, 0], [1, 1]])
    assert torch.equal(to_tokens(tokens, space), tokens)
    assert torch.equal(to_tokens(space.one_hot(tokens), space), tokens)
    assert torch.equal(to_tokens(torch.tensor([[1.0, 0.0]]), Binary(2)), torch.tensor([[1, 0]]))


def test_check_weights_passes_finite_weights_and_names_the_first_bad_state():
    assert _check_weights(torch.tensor([0.0, 2.0]), torch.tensor([-1.0, -1.0])) is None
    # an infinite energy with log q = -inf is not a support error (the weight is 0 anyway)
    assert _check_weights(torch.tensor([0.0, float("inf")]), torch.tensor([0.0, float("-inf")])) is None
    with pytest.raises(ValueError, match=r"^the proposal's log q is -inf at a state it sampled \(index 2\)"):
        _check_weights(torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, float("-inf"), float("-inf")]))


class _ReportsCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device: drives the accelerator branch of
    ``DiscreteFlowSampler._check`` (values read every ``check_every`` updates) on the CPU."""

    @property
    def device(self):
        return torch.device("cuda")


def _cuda_like(t):
    return torch.Tensor._make_subclass(_ReportsCuda, t)


def test_accelerator_checks_accumulate_flags_and_the_lowest_ess_between_reads():
    flow = _flow(check_every=3)
    good_e, good_q = _cuda_like(torch.zeros(4)), _cuda_like(torch.zeros(4))
    nan_e = _cuda_like(torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow._check(good_e, good_q, torch.tensor(0.5))  # update 1: read, fine
        flow._check(nan_e, good_q, torch.tensor(0.5))  # update 2: not read
    with pytest.raises(ValueError) as info:
        flow._check(good_e, good_q, torch.tensor(0.5))  # update 3: read, the flag of update 2
    assert str(info.value) == (
        "the energy returned NaN or -inf, or the proposal's log q was -inf where the energy is "
        "finite, on proposal states within the last 3 data-free updates; check the energy and "
        "give the proposal full support")
    assert flow._monitor == {}
    # the lowest ESS fraction of the window is the one warned about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow._check(good_e, good_q, torch.tensor(0.01))  # update 4: not read
        flow._check(good_e, good_q, torch.tensor(0.5))  # update 5: not read
    with pytest.warns(LowESSWarning) as rec:
        flow._check(good_e, good_q, torch.tensor(0.5))  # update 6: read
    assert str(rec[0].message) == (
        "importance-weight ESS collapsed to 0.01 of the batch (lowest of the last 3 updates) "
        "(< ess_threshold=0.05); use a proposal closer to the target "
        "(FactorizedProposal.fit(data), a higher temperature) or a larger batch_size")
    # a failing current batch gives the detailed message
    flow._check(good_e, good_q, torch.tensor(0.5))
    flow._check(good_e, good_q, torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"^the energy returned NaN or -inf on proposal states"):
        flow._check(nan_e, good_q, torch.tensor(0.5))


def test_low_ess_warning_on_the_cpu_names_the_caller_and_its_threshold():
    flow = _flow(ess_threshold=0.5, batch_size=64)
    with pytest.warns(LowESSWarning) as rec:
        flow.update(_Scaled(30.0), generator=torch.Generator().manual_seed(0))
    ess = float(flow.stats["ess_fraction"])
    assert str(rec[0].message) == (
        f"importance-weight ESS collapsed to {ess:.3g} of the batch (< ess_threshold=0.5); use a "
        "proposal closer to the target (FactorizedProposal.fit(data), a higher temperature) or "
        "a larger batch_size")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow._check(torch.zeros(4), torch.zeros(4), torch.tensor(0.5))  # at the threshold
        flow._check(torch.zeros(4), torch.zeros(4), torch.tensor(0.9))
        _flow(ess_threshold=0.0)._check(torch.zeros(4), torch.zeros(4), torch.tensor(0.0))


class _Scaled(EnergyModel):
    def __init__(self, scale):
        super().__init__(Binary(3))
        self.scale = scale

    def energy(self, x):
        return self.scale * x.sum(-1)


def test_bernoulli_uniform_and_fitted_proposals():
    q = FactorizedProposal.bernoulli(torch.tensor([0.25, 0.5, 1.0]))
    torch.testing.assert_close(q.probs, torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.0, 1.0]]))
    assert q.dim == 3 and q.num_classes == 2 and q.probs.dtype == torch.float32
    x = torch.tensor([[1, 0, 1], [0, 1, 0]])
    torch.testing.assert_close(q.log_prob(x), torch.tensor([math.log(0.125), float("-inf")]))
    q = FactorizedProposal.bernoulli([0.5, 0.5])  # a list is accepted
    torch.testing.assert_close(q.probs, torch.full((2, 2), 0.5))
    u = FactorizedProposal.uniform(2, 4)
    torch.testing.assert_close(u.log_prob(torch.tensor([[3, 0]])), torch.tensor([-2 * math.log(4.0)]))
    assert FactorizedProposal.uniform(5).num_classes == 2
    fit = FactorizedProposal.fit(torch.tensor([[0, 2], [0, 1], [1, 1]]), 3, smoothing=1.0)
    torch.testing.assert_close(fit.probs, torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]]) / 6)
    fit0 = FactorizedProposal.fit(torch.tensor([[0, 2], [0, 1]]), 3, smoothing=0.0)
    torch.testing.assert_close(fit0.probs, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))
    fit_default = FactorizedProposal.fit(torch.tensor([[0, 2], [0, 1], [1, 1]]), 3)
    torch.testing.assert_close(fit_default.probs, fit.probs)
    # probs are renormalised to sum 1 exactly
    near = FactorizedProposal(torch.tensor([[0.50002, 0.5]]))
    torch.testing.assert_close(near.probs.sum(-1), torch.ones(1), rtol=0, atol=1e-7)


def test_proposal_samples_follow_the_probs_and_the_generator():
    q = FactorizedProposal(torch.tensor([[0.1, 0.9], [0.7, 0.3]]))
    a = q.sample(4000, generator=torch.Generator().manual_seed(0))
    b = q.sample(4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (4000, 2)
    torch.testing.assert_close(a.float().mean(0), torch.tensor([0.9, 0.3]), atol=0.03, rtol=0)


def test_set_and_get_proposal():
    flow = _flow()
    default = flow.get_proposal()
    assert isinstance(default, FactorizedProposal)
    torch.testing.assert_close(default.probs, torch.full((3, 2), 0.5))
    assert "proposal" in dict(flow.named_children())

    class Plain:
        def sample(self, n, generator=None):
            return torch.zeros(n, 3, dtype=torch.long)

        def log_prob(self, x):
            return torch.zeros(x.shape[0])

    plain = Plain()
    flow.set_proposal(plain)
    assert flow.get_proposal() is plain and "proposal" not in dict(flow.named_children())
    fitted = FactorizedProposal.bernoulli(torch.tensor([0.1, 0.2, 0.3]))
    flow.set_proposal(fitted)
    assert flow.get_proposal() is fitted and dict(flow.named_children())["proposal"] is fitted
    other = _flow(proposal=plain)
    assert other.get_proposal() is plain and "proposal" not in dict(other.named_children())


def test_scaled_conditional_velocity_and_conditional_velocity():
    path = MixturePath(3, "uniform", PolynomialSchedule(2))
    x_t = torch.tensor([[0, 2]])
    x1 = torch.tensor([[1, 2]])
    t = torch.tensor([0.5])
    # kappa' = 2 t = 1; delta(x1) - delta(x_t)
    diff = torch.tensor([[[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(path.scaled_conditional_velocity(x_t, x1, t), diff)
    # rate = kappa' / (1 - kappa) = 1 / 0.75
    torch.testing.assert_close(path.conditional_velocity(x_t, x1, 0.5), diff / 0.75)


def test_recipes_support_the_flow_spaces():
    rec = FlowNegatives(_flow())
    assert rec.supports(Lin(Binary(3)))
    assert not rec.supports(Lin(Binary(4)))
    assert not rec.supports(Lin(Categorical(3, 3)))
    assert BootstrapFlow(_flow()).supports(Lin(Categorical(3, 2)))


def test_velocity_regression_loss_values():
    """Hand-computed: L = mean_b w_b sum_{d, j != x_t^d} ((1 - kappa) u - kappa' (delta_x1 - delta_xt))^2."""
    uniform = MixturePath(2, "uniform")
    u = torch.tensor([[[5.0, 2.0], [4.0, 7.0]], [[1.0, 3.0], [2.0, 6.0]]])
    x_t = torch.tensor([[0, 1], [1, 1]])
    x1 = torch.tensor([[1, 1], [1, 0]])
    t = torch.tensor([0.5, 0.75])
    # b=0: kappa .5: d0 j=1: (.5*2 - 1)^2 = 0; d1 j=0: (.5*4 - 0)^2 = 4 -> 4
    # b=1: kappa .75: d0 j=0: (.25*1 - 0)^2 = 1/16; d1 j=0: (.25*2 - 1)^2 = 1/4 -> 5/16
    per = torch.tensor([4.0, 5 / 16])
    torch.testing.assert_close(velocity_regression_loss(u, x_t, x1, t, uniform), per.mean())
    w = torch.tensor([0.5, 1.5])
    torch.testing.assert_close(velocity_regression_loss(u, x_t, x1, t, uniform, w), (w * per).mean())
    # mask source: only MASK rows, every j: target kappa' delta(j = x1)
    xm = torch.tensor([[2, 1], [2, 2]])
    # b=0: d0 (.5*5 - 0)^2 + (.5*2 - 1)^2 = 6.25; b=1: d0 (.25 - 0)^2 + (.75 - 1)^2 = 1/8,
    # d1 (.5 - 1)^2 + (1.5 - 0)^2 = 2.5
    per = torch.tensor([6.25, 0.125 + 2.5])
    torch.testing.assert_close(velocity_regression_loss(u, xm, x1, t, PATH), per.mean())
    torch.testing.assert_close(velocity_regression_loss(u, xm, x1, t, PATH, w), (w * per).mean())


def test_posterior_loss_values():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]], [[math.log(3.0), 0.0], [0.0, 0.0]]])
    x1 = torch.tensor([[1, 0], [1, 1]])
    xm = torch.tensor([[2, 2], [0, 2]])
    t = torch.tensor([0.3, 0.6])
    # b=0: -log(3/4) - log(1/2); b=1: only d1 masked: -log(1/2)
    per = torch.tensor([-math.log(0.75) + math.log(2.0), math.log(2.0)])
    torch.testing.assert_close(posterior_loss(logits, xm, x1, t, PATH), per.mean())
    w = torch.tensor([2.0, 0.0])
    torch.testing.assert_close(posterior_loss(logits, xm, x1, t, PATH, w), (w * per).mean())
    uniform = MixturePath(2, "uniform")
    per_u = torch.tensor([-math.log(0.75) + math.log(2.0), -math.log(0.25) + math.log(2.0)])
    torch.testing.assert_close(posterior_loss(logits, x1, x1, t, uniform), per_u.mean())


def test_renoise_keeps_the_tokens_device():
    out = _flow().renoise(torch.zeros(4, 3, dtype=torch.long, device="meta"), 0.5)
    assert out.device.type == "meta" and out.shape == (4, 3)


@pytest.mark.parametrize("objective", ["velocity", "posterior"])
def test_flow_loss_is_the_objective_at_uniform_times_below_one(objective, monkeypatch):
    """loss(x1): t = U[0, 1) * (1 - 1e-3), x_t ~ p_t(. | x1), then the objective's loss; the
    tokens and times are not validated (no host read per training step)."""
    flow = _flow(objective=objective)
    x1 = torch.tensor([[0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]])
    w = torch.tensor([0.5, 1.0, 1.5, 1.0])
    with torch.no_grad():
        for p in flow.model.net[-1].parameters():
            p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape))
    g = torch.Generator().manual_seed(7)
    t = torch.rand(4, generator=g) * (1.0 - 1e-3)
    x_t = PATH._sample(x1, t, g)
    out = flow.model(x_t, t)
    if objective == "posterior":
        expected = posterior_loss(out, x_t, x1, t, PATH, w)
    else:
        expected = velocity_regression_loss(out * PATH.schedule.rate(t)[:, None, None], x_t, x1,
                                            t, PATH, w)

    def no_check(*args, **kwargs):
        raise AssertionError("validated in a training step")

    monkeypatch.setattr(MixturePath, "check_tokens", no_check)
    monkeypatch.setattr("ebmflow.discrete_flows.path.check_time", no_check)
    torch.manual_seed(123)
    got = flow.loss(x1, w, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected)


def test_fit_step_clears_syncs_and_clips_gradients():
    class WithUnused(VelocityModel):
        def __init__(self):
            super().__init__(3, 2)
            self.inner = MLPVelocity(3, 2, hidden=(4,))
            self.unused = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x_t, t):
            return self.inner(x_t, t)

    torch.manual_seed(0)
    model = WithUnused()
    with torch.no_grad():
        for p in model.inner.net[-1].parameters():
            p.fill_(0.3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    flow = DiscreteFlowSampler(model, PATH, optimizer=opt, grad_clip=1e-3)
    synced = []
    flow.grad_sync = synced.append
    model.unused.grad = torch.ones(())
    before = [p.detach().clone() for p in model.parameters()]
    stats = flow.fit_step(torch.tensor([[0, 1, 1], [1, 0, 0]]), None, torch.Generator().manual_seed(0))
    assert set(stats) == {"flow_loss"} and not stats["flow_loss"].requires_grad
    assert model.unused.grad is None  # zero_grad(set_to_none=True)
    assert len(synced) == 1 and [id(p) for p in synced[0]] == [id(p) for p in model.parameters()]
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    torch.testing.assert_close(step.norm(), torch.tensor(1e-3), rtol=1e-4, atol=0)


def test_update_draws_only_from_the_generator_and_keeps_its_stats():
    energy = Lin(Binary(3))
    data = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])

    def act(flow, g):
        stats = flow.update(energy, data, generator=g)
        assert flow.stats is stats
        return stats, _params(flow.model)

    stats = _under_two_global_seeds(lambda: _flow(fit_to="data", updates_per_call=2), act)[0]
    assert set(stats) == {"flow_loss"}
    stats = _under_two_global_seeds(lambda: _flow(batch_size=8, updates_per_call=2), act)[0]
    assert set(stats) == {"flow_loss", "ess", "ess_fraction", "weight_max", "log_weight_std"}


class _OneBad(EnergyModel):
    """E = 0 except at the first state of the batch, where it is ``bad``."""

    def __init__(self, bad):
        super().__init__(Binary(3))
        self.bad = bad

    def energy(self, x):
        e = torch.zeros(x.shape[0])
        e[0] = self.bad
        return e


class _FirstOutside:
    """A proposal with log q = -inf at the first of its (all-zero) states."""

    def sample(self, n, generator=None):
        return torch.zeros(n, 3, dtype=torch.long)

    def log_prob(self, x):
        lq = torch.full((x.shape[0],), -3 * math.log(2.0))
        lq[0] = float("-inf")
        return lq


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_cpu_update_refuses_one_nan_or_minus_inf_energy(bad):
    with pytest.raises(ValueError, match=r"^the energy returned NaN or -inf on proposal states; "
                                         r"check the energy model$"):
        _flow(batch_size=4).update(_OneBad(bad))


def test_cpu_update_refuses_a_proposal_without_support_at_a_finite_energy():
    flow = _flow(batch_size=4, proposal=_FirstOutside())
    with pytest.raises(ValueError, match=r"^the proposal's log q is -inf at a state it sampled "
                                         r"\(index 0\) where the energy is finite \(0\)"):
        flow.update(_OneBad(0.0))


def test_velocity_is_scaled_in_the_models_dtype():
    class Half(VelocityModel):
        def __init__(self):
            super().__init__(2, 2)
            self.w = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16))

        def forward(self, x_t, t):
            return self.w * torch.ones(x_t.shape[0], 2, 2, dtype=torch.bfloat16)

    flow = DiscreteFlowSampler(Half(), MixturePath(2))
    u = flow.velocity(torch.full((1, 2), 2), torch.tensor([0.3]))
    assert u.dtype == torch.bfloat16
    torch.testing.assert_close(u.float(), torch.full((1, 2, 2), 1 / 0.7).to(torch.bfloat16).float(),
                               rtol=0, atol=0)


def test_time_features_values():
    from ebmflow.discrete_flows.models import time_features

    t = torch.tensor([0.25, 0.7], dtype=torch.float64)
    f = time_features(t, 3)
    assert f.shape == (2, 7) and f.dtype == torch.float64
    for b, tb in enumerate(t.tolist()):
        angles = [math.pi * 2.0**k * tb for k in range(3)]
        expected = [tb] + [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
        torch.testing.assert_close(f[b], torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-14, atol=1e-14)


def test_mlp_velocity_defaults_and_dtypes():
    model = MLPVelocity(3)
    assert model.num_classes == 2 and model.dim == 3
    assert model.embed.num_embeddings == 3 and model.embed.embedding_dim == 8
    assert model.time_frequencies == 4 and model.schedule is None
    linears = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    assert [m.in_features for m in linears] == [3 * 8 + 2 * 4 + 1, 256, 256, 256]
    assert [m.out_features for m in linears] == [256, 256, 256, 3 * 2]
    assert all(isinstance(model.net[i], torch.nn.SiLU) for i in (1, 3, 5))
    assert MLPVelocity(2, hidden=(1,)).net[0].out_features == 1
    # a float64 time is cast to the embedding's dtype; the schedule's rate to the output's
    scaled = MLPVelocity(2, 2, hidden=(4,), schedule=LinearSchedule())
    with torch.no_grad():
        scaled.net[-1].bias.fill_(1.0)
    out = scaled(torch.tensor([[0, 2]]), torch.tensor([0.5], dtype=torch.float64))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 2, 2), 2.0))


def test_discrete_flow_sampler_defaults():
    flow = DiscreteFlowSampler(MLPVelocity(3, 2, hidden=(4,)))
    assert flow.batch_size == 128 and flow.temperature == 1.0 and flow.updates_per_call == 1
    assert flow.ess_threshold == 0.05 and flow.check_every == 100 and flow.check_weights is True
    assert flow.grad_clip is None and flow.objective == "velocity" and flow.fit_to == "energy"
    assert flow.scale_by_rate is True
    assert flow.path.source == "mask" and flow.path.num_classes == 2
    assert flow.solver.path is flow.path and flow.solver.dt == 0.05 and flow.solver.jump == "exact"
    assert flow.solver.compile is False
    assert flow.optimizer.param_groups[0]["lr"] == 3e-3
    assert DiscreteFlowSampler(MLPVelocity(3, hidden=(4,)), objective="posterior").scale_by_rate is False
    own = MLPVelocity(3, hidden=(4,), schedule=LinearSchedule())
    assert DiscreteFlowSampler(own).scale_by_rate is False
    assert _flow(check_every=1).check_every == 1
    three = DiscreteFlowSampler(MLPVelocity(2, 3, hidden=(4,)))
    torch.testing.assert_close(three.get_proposal().probs, torch.full((2, 3), 1 / 3))
    assert three.path.vocab_size == 4
    path = MixturePath(2, "uniform")
    solver = CTMCSolver(path, dt=0.25, jump="linear")
    assert DiscreteFlowSampler(MLPVelocity(3, hidden=(4,)), path, solver).solver is solver


def test_weighted_losses_keep_the_loss_dtype():
    u = torch.zeros(2, 3, 2)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    t = torch.tensor([0.5, 0.5])
    x1 = torch.tensor([[0, 1, 1], [1, 1, 0]])
    loss = velocity_regression_loss(u, torch.full((2, 3), 2), x1, t, PATH, w)
    assert loss.dtype == torch.float32
    # every masked coordinate contributes (kappa' = 1)^2 = 1: per sample 3, weighted mean 6
    torch.testing.assert_close(loss, torch.tensor(6.0))


def test_path_sample_draws_from_the_generator_and_keeps_given_sources():
    uniform = MixturePath(3, "uniform")
    x1 = torch.full((16, 4), 2)
    out = _under_two_global_seeds(lambda: None, lambda _, g: uniform.sample(x1, 0.5, g))
    assert 0 < int((out != 2).sum()) < out.numel()
    src = _under_two_global_seeds(lambda: None, lambda _, g: uniform.sample_source(8, 5, g))
    assert src.dtype == torch.long and src.min() >= 0 and src.max() <= 2 and len(src.unique()) == 3
    assert uniform.sample_source(2, 3, device="meta").device.type == "meta"
    masked = PATH.sample_source(2, 3, device="meta")
    assert masked.device.type == "meta" and masked.dtype == torch.long
    x0 = torch.tensor([[1, 0, 1, 1]])
    assert torch.equal(uniform.sample(torch.full((1, 4), 2), 0.0, x0=x0), x0)
    assert torch.equal(MixturePath(3).sample(torch.full((1, 4), 2), 1.0), torch.full((1, 4), 2))
    assert MixturePath(2, "uniform").vocab_size == 2 and MixturePath(2, "uniform").mask_token is None


def test_path_keeps_a_coordinate_when_u_is_below_kappa(monkeypatch):
    """keep = u < kappa(t): with u = kappa = 0.5 the source token stays."""
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None, device=None: torch.full(shape, 0.5))
    x1 = torch.zeros(2, 3, dtype=torch.long)
    assert torch.equal(PATH.sample(x1, 0.5), torch.full((2, 3), 2))
    assert torch.equal(PATH.sample(x1, 0.5000001), x1)


def test_velocity_model_accepts_one_coordinate_and_proposals_are_float32():
    assert MLPVelocity(1, hidden=(4,)).dim == 1
    q = FactorizedProposal(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    assert q.probs.dtype == torch.float32


def test_time_grid_values():
    from ebmflow.discrete_flows.solver import time_grid

    assert time_grid(0.0, 1.0) == [0.0, 1.0]
    assert time_grid(0.5, 2.0) == [0.5, 1.0]
    assert time_grid(0.0, 0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    grid = time_grid(0.0, 0.3)
    assert grid[:-1] == pytest.approx([0.0, 0.3, 0.6, 0.9], abs=1e-15) and grid[-1] == 1.0


def test_jump_scale_values():
    """c of the step P(j) = c u(j): exact (kappa(t + dt) - kappa(t)) / kappa'(t), exponential
    (1 - exp(-r dt)) / r, linear dt; the last step (1 - kappa(t)) / kappa'(t)."""
    sq = MixturePath(2, "mask", PolynomialSchedule(2))
    t, dt = 0.1, 0.05
    kappa0, kappa1, d_kappa = t * t, (t + dt) ** 2, 2 * t
    exact = CTMCSolver(sq, jump="exact")
    assert exact.jump_scale(t, dt) == pytest.approx((kappa1 - kappa0) / d_kappa, rel=1e-13)
    assert exact.jump_scale(t, dt, last=True) == pytest.approx((1 - kappa0) / d_kappa, rel=1e-13)
    rate = d_kappa / (1 - kappa0)
    assert CTMCSolver(sq, jump="exponential").jump_scale(t, dt) == pytest.approx(
        -math.expm1(-rate * dt) / rate, rel=1e-13)
    assert CTMCSolver(sq, jump="linear").jump_scale(t, dt) == dt
    # t + dt beyond 1 is cut at 1
    assert exact.jump_scale(0.9, 0.25) == pytest.approx((1 - 0.81) / 1.8, rel=1e-13)
    # kappa'(0) = 0: the velocity vanishes, c = dt
    assert exact.jump_scale(0.0, 0.25) == 0.25
    assert CTMCSolver(PATH).jump_scale(0.0, 0.25) == 0.25


def test_step_probabilities_clamp_and_fill_empty_rows():
    """Off-diagonal c u clamped to [0, 1], the diagonal 1 - sum, rows normalised; at the last
    step a masked row with no mass left is uniform over the data tokens."""
    uniform = MixturePath(3, "uniform")
    solver = CTMCSolver(uniform, jump="linear")
    x_t = torch.tensor([[0, 0]])
    u = torch.tensor([[[0.0, 3.0, 1.0], [0.0, 1.0, -0.5]]])  # c = dt = 0.5
    probs = solver.step_probs(u, x_t, 0.0, 0.5)
    # row 0: off [1, 0.5] (1.5 clamped to 1), diag 0 -> [0, 2/3, 1/3]
    # row 1: off [0.5, 0] (-0.25 clamped to 0), diag 0.5
    torch.testing.assert_close(probs, torch.tensor([[[0.0, 2 / 3, 1 / 3], [0.5, 0.5, 0.0]]]))
    masked = CTMCSolver(MixturePath(3))
    x_t = torch.tensor([[3, 3, 1]])
    u = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 2.0], [0.0, 0.0, 0.0]]])
    probs = masked.step_probs(u, x_t, 0.5, 0.5, last=True)
    torch.testing.assert_close(probs, torch.tensor([[[1 / 3, 1 / 3, 1 / 3, 0.0],
                                                    [0.5, 0.0, 0.5, 0.0],
                                                    [0.0, 1.0, 0.0, 0.0]]]))


class _Zero(EnergyModel):
    """E = 0 on Binary(3): every back-and-forth proposal is accepted."""

    def __init__(self):
        super().__init__(Binary(3))

    def energy(self, x):
        return torch.zeros(x.shape[0])


def test_back_and_forth_update_moves_with_the_generator():
    data = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]).repeat(4, 1)

    def act(rec, g):
        stats = rec.update(_Zero(), data, generator=g)
        return stats, _params(rec.flow.model)

    stats = _under_two_global_seeds(lambda: BackAndForth(_flow(), t_star=0.3), act)[0]
    assert stats["accept_rate"] == 1.0


def test_bernoulli_rounds_p_to_float32_first():
    p = torch.tensor([0.8572511383941286, 0.4485880948000136], dtype=torch.float64)
    p32 = p.float()
    expected = torch.stack([1.0 - p32, p32], dim=-1)
    expected = expected / expected.sum(-1, keepdim=True)
    q = FactorizedProposal.bernoulli(p)
    assert torch.equal(q.probs, expected)


def test_small_settings_are_accepted():
    assert _flow(batch_size=1).batch_size == 1
    other = _flow(proposal=_FirstOutside())
    other.set_proposal(_FirstOutside())  # nothing registered to remove
    assert isinstance(other.get_proposal(), _FirstOutside)
    assert CTMCSolver(PATH).compile_backend == "inductor"


def test_deprecated_ess_does_not_check_values():
    with pytest.warns(DeprecationWarning):
        from ebmflow.discrete_flows import effective_sample_size

        ess = effective_sample_size(torch.tensor([0.0, float("nan")]))
    assert torch.isnan(ess)


def test_compiled_blocks_are_cached_per_velocity_and_shape(monkeypatch):
    backends = []

    def fake_compile(fn, **kwargs):
        backends.append(kwargs.get("backend"))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    path = MixturePath(3, "mask")
    solver = CTMCSolver(path, dt=1 / 7, compile=True)
    solver.compile_backend = "eager"
    torch.manual_seed(0)
    flow = DiscreteFlowSampler(MLPVelocity(4, 3, hidden=(8,), schedule=path.schedule), path,
                               solver=solver)
    flow.sample_tokens(5, generator=torch.Generator().manual_seed(0))
    (key, block), = solver._blocks.items()
    assert key == (id(flow), DiscreteFlowSampler.velocity, (5, 4), torch.long, 6, 5)
    assert backends == ["eager"] and block.key == key
    flow.sample_tokens(5, generator=torch.Generator().manual_seed(1))
    assert solver._blocks == {key: block}  # reused, not rebuilt
    assert backends == ["eager"]

    def velocity(x, t):  # a plain function is its own owner
        return torch.zeros(x.shape[0], x.shape[1], 3)

    out = solver.sample(velocity, path.sample_source(5, 4), generator=torch.Generator().manual_seed(0))
    (key, _), = solver._blocks.items()
    assert key == (id(velocity), None, (5, 4), torch.long, 6, 5)
    assert out.x.max() < 3


def test_compiled_blocks_run_on_the_states_device(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    path = MixturePath(3, "mask")
    torch.manual_seed(0)
    model = MLPVelocity(4, 3, hidden=(8,), schedule=path.schedule).to("meta")
    flow = DiscreteFlowSampler(model, path, solver=CTMCSolver(path, dt=1 / 7, compile=True))
    out = flow.sample_tokens(5)
    assert out.x.device.type == "meta" and out.x.shape == (5, 4)


def test_ctmc_solver_pickles_without_its_compiled_blocks():
    """``__getstate__`` leaves the compiled blocks out (a cache rebuilt on use) and keeps the
    rest; the solver itself keeps its blocks."""
    import pickle

    solver = CTMCSolver(PATH, 0.1)
    solver._blocks = {"key": "block"}
    state = solver.__getstate__()
    assert state["_blocks"] == {} and isinstance(state["_blocks"], dict)
    assert solver._blocks == {"key": "block"}
    assert {k: v for k, v in state.items() if k != "_blocks"} == {
        k: v for k, v in vars(solver).items() if k != "_blocks"}
    copy = pickle.loads(pickle.dumps(solver))
    assert copy._blocks == {} and copy.dt == solver.dt and copy.jump == solver.jump
