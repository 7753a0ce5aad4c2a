"""Bad input at every public entry point gives a ``ValueError`` that names the argument, what was
expected and what was received (never a bare torch RuntimeError, never a silent result).

One table row per fault: (id, call, regex the message must match). The regexes require the
argument's name and the received value or shape, so a vague message fails. Policy (see
docs/reliability.md): values (NaN/inf, out-of-range states) are checked once at the entry points
that own data (``Space.validate``, ``Sampler.sample``/``run`` x0 via the space, ``Trainer.fit``
data, metrics, data encoders); per-step functions (``EnergyModel.forward``, losses) check
shapes, dtypes and spaces, and propagate NaN like torch does.

Already covered elsewhere and not repeated: spaces (tests/test_spaces.py), sampler
hyper-parameters (tests/test_samplers_continuous.py, tests/test_samplers_discrete.py), the CLI
(tests/test_cli.py), checkpoints (tests/test_checkpoint.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from ebmflow.data import gray_decode, gray_encode, toy_2d
from ebmflow.discrete_flows import (
    CTMCSolver,
    MixturePath,
    MLPVelocity,
    PolynomialSchedule,
    importance_weights,
)
from ebmflow.energy import (
    BernoulliBaseEnergy,
    GaussianMixtureEnergy,
    IsingEnergy,
    MLPEnergy,
    TiltedEnergy,
    enumerate_binary,
)
from ebmflow.flows import ContinuousFlow, FlowMC, RealNVP
from ebmflow.losses import (
    BernoulliPerturbation,
    CategoricalPerturbation,
    ContrastiveDivergence,
    DenoisingScoreMatching,
    EnergyDiscrepancy,
    GaussianPerturbation,
    GridPerturbation,
)
from ebmflow.metrics import effective_sample_size, kl_divergence, mmd, mode_weights, total_variation
from ebmflow.samplers import (
    HMC,
    MALA,
    DiscreteLangevin,
    Gibbs,
    GibbsWithGradients,
    Langevin,
    PersistentSampler,
    ReplayBuffer,
)
from ebmflow.spaces import Binary, Categorical, Continuous
from ebmflow.training import EMA, Trainer

NAN, INF = float("nan"), float("inf")
C2, B4, K33 = Continuous(2), Binary(4), Categorical(3, 3)


def _mlp(space):
    torch.manual_seed(0)
    return MLPEnergy(space, hidden=(8,))


def _flow(dim=2):
    return RealNVP(dim, n_layers=2, hidden=(4,))


ED = lambda: EnergyDiscrepancy(GaussianPerturbation(1.0))  # noqa: E731

CASES = [
    # spaces
    ("Continuous(2.5)", lambda: Continuous(2.5), r"shape.*positive int.*got 2\.5"),
    ("Continuous((2.5,)) (no silent truncation)", lambda: Continuous((2.5,)), r"shape.*2\.5"),
    ("Categorical(3, 1)", lambda: Categorical(3, 1), r"num_classes.*>= 2.*got 1"),
    # energies: forward diagnoses shape / dtype / range failures of the network
    ("MLP wrong event shape", lambda: _mlp(C2)(torch.zeros(5, 3)), r"x has shape \(5, 3\).*\(B, 2\)"),
    ("MLP 1-d input", lambda: _mlp(C2)(torch.zeros(2)), r"x has shape \(2,\).*\(B, 2\)"),
    ("MLP long continuous", lambda: _mlp(C2)(torch.zeros(5, 2, dtype=torch.long)),
     r"x has dtype torch\.int64.*float"),
    ("MLP float64 vs float32", lambda: _mlp(C2)(torch.zeros(5, 2, dtype=torch.float64)),
     r"x has dtype torch\.float64.*float32 parameters"),
    ("MLP categorical out of range", lambda: _mlp(K33)(torch.full((2, 3), 5)),
     r"x has values in \[5, 5\].*\[0, 2\]"),
    ("MLP hidden 0", lambda: MLPEnergy(C2, hidden=(0,)), r"hidden.*positive.*\(0,\)"),
    ("MLP activation", lambda: MLPEnergy(C2, hidden=(4,), activation="foo"), r"activation 'foo'"),
    ("GMM NaN means", lambda: GaussianMixtureEnergy(torch.tensor([[NAN, 0.0]])), r"means.*finite"),
    ("GMM NaN weights", lambda: GaussianMixtureEnergy(torch.zeros(2, 2), 1.0,
                                                      torch.tensor([NAN, 1.0])), r"weights.*nan"),
    ("GMM negative scale", lambda: GaussianMixtureEnergy(torch.zeros(2, 2), -1.0), r"scales"),
    ("GMM 1-d means", lambda: GaussianMixtureEnergy(torch.zeros(2)), r"means.*\(K, D\).*\(2,\)"),
    ("Ising non-square", lambda: IsingEnergy(torch.zeros(3, 4)), r"coupling.*\(3, 4\)"),
    ("Ising NaN", lambda: IsingEnergy(torch.full((2, 2), NAN)), r"coupling and bias.*finite"),
    ("Ising bias length", lambda: IsingEnergy(torch.zeros(3, 3), torch.zeros(2)),
     r"bias.*\(3,\).*\(2,\)"),
    ("Bernoulli inf logits", lambda: BernoulliBaseEnergy(torch.tensor([INF, 0.0])), r"logits.*finite"),
    ("enumerate_binary too large", lambda: enumerate_binary(40), r"40"),
    ("Tilted dim mismatch", lambda: TiltedEnergy(_mlp(C2), _flow(3)), r"dim=3.*Continuous\(2\)"),
    # samplers: entry points
    ("MALA n=0", lambda: MALA(0.1).sample(_mlp(C2), 0), r"n must be a positive int, got 0"),
    ("MALA x0 shape", lambda: MALA(0.1).sample(_mlp(C2), x0=torch.zeros(4, 3)),
     r"x0 has shape \(4, 3\).*\(B, 2\)"),
    ("MALA x0 NaN", lambda: MALA(0.1).sample(_mlp(C2), x0=torch.full((4, 2), NAN)), r"x0.*NaN"),
    ("MALA x0 long", lambda: MALA(0.1).sample(_mlp(C2), x0=torch.zeros(4, 2, dtype=torch.long)),
     r"x0 has dtype torch\.int64"),
    ("MALA on Binary", lambda: MALA(0.1).sample(_mlp(B4), 4), r"MALA cannot sample Binary\(4\)"),
    ("Gibbs on Continuous", lambda: Gibbs().sample(_mlp(C2), 4), r"Gibbs cannot sample Continuous"),
    ("Gibbs categorical out of range", lambda: Gibbs().run(_mlp(K33), torch.full((4, 3), 7), 2),
     r"x0 has a value 7 outside \[0, 3\)"),
    ("Gibbs binary 0.5", lambda: Gibbs().run(_mlp(B4), torch.full((4, 4), 0.5), 2),
     r"x0 has a value 0\.5 outside \{0, 1\}"),
    ("GwG float categorical", lambda: GibbsWithGradients().run(_mlp(K33), torch.zeros(4, 3), 2),
     r"x0 has dtype torch\.float32.*long"),
    ("Gibbs empty batch", lambda: Gibbs().run(_mlp(B4), torch.zeros(0, 4), 2), r"\(0, 4\).*B >= 1"),
    ("HMC n_leapfrog 2.5", lambda: HMC(0.1, n_leapfrog=2.5), r"n_leapfrog.*got 2\.5"),
    ("Langevin step inf", lambda: Langevin(INF), r"step_size.*got inf"),
    ("DULA step NaN", lambda: DiscreteLangevin(NAN), r"step_size.*got nan"),
    ("ReplayBuffer capacity 0", lambda: ReplayBuffer(C2, capacity=0), r"capacity.*got 0"),
    ("PersistentSampler non-MCMC", lambda: PersistentSampler("x", ReplayBuffer(C2)),
     r"mcmc must be an MCMCSampler, got str"),
    # losses
    ("ED m 0", lambda: EnergyDiscrepancy(GaussianPerturbation(1.0), m=0), r"m .*got 0"),
    ("ED w NaN", lambda: EnergyDiscrepancy(GaussianPerturbation(1.0), w=NAN), r"w .*got nan"),
    ("Gaussian t NaN", lambda: GaussianPerturbation(NAN), r"t must.*got nan"),
    ("Bernoulli eps 1.5", lambda: BernoulliPerturbation(1.5), r"eps.*got 1\.5"),
    ("Categorical kind", lambda: CategoricalPerturbation(3, kind="foo"), r"kind.*'foo'"),
    ("ED data shape", lambda: ED()(_mlp(C2), torch.zeros(4, 3)), r"data has shape \(4, 3\)"),
    ("ED Gaussian on Binary", lambda: ED()(_mlp(B4), torch.zeros(4, 4)),
     r"GaussianPerturbation.*Binary\(4\)"),
    ("ED Grid K mismatch", lambda: EnergyDiscrepancy(GridPerturbation())(_mlp(K33),
                                                                         torch.zeros(4, 3).long()),
     r"num_classes=3"),
    ("CD without sampler", lambda: ContrastiveDivergence()(_mlp(C2), torch.zeros(4, 2)),
     r"needs a sampler"),
    ("CD wrong sampler space", lambda: ContrastiveDivergence()(_mlp(C2), torch.zeros(4, 2), Gibbs()),
     r"Gibbs cannot sample Continuous\(2\)"),
    ("DSM on Binary", lambda: DenoisingScoreMatching()(_mlp(B4), torch.zeros(4, 4)),
     r"Continuous.*got Binary\(4\)"),
    # trainer
    ("Trainer NaN data", lambda: Trainer(_mlp(C2), ED(), progress=False).fit(
        torch.full((8, 2), NAN), steps=1, batch_size=4), r"data.*NaN"),
    ("Trainer data shape", lambda: Trainer(_mlp(C2), ED(), progress=False).fit(
        torch.zeros(8, 3), steps=1, batch_size=4), r"data has shape \(8, 3\)"),
    ("Trainer steps -1", lambda: Trainer(_mlp(C2), ED(), progress=False).fit(
        torch.zeros(8, 2), steps=-1), r"steps.*got -1"),
    ("Trainer CD without sampler", lambda: Trainer(_mlp(C2), ContrastiveDivergence()),
     r"sampler=\.\.\."),
    ("EMA decay 1.5", lambda: EMA(_mlp(C2), decay=1.5), r"decay.*1\.5"),
    # metrics
    ("mmd event shapes", lambda: mmd(torch.zeros(4, 2), torch.zeros(4, 3)), r"x is \(4, 2\), y is \(4, 3\)"),
    ("mmd NaN", lambda: mmd(torch.full((4, 2), NAN), torch.zeros(4, 2)), r"x contains NaN"),
    ("mmd empty", lambda: mmd(torch.zeros(0, 2), torch.zeros(4, 2)), r"x has 0 samples"),
    ("mmd bandwidth 0", lambda: mmd(torch.zeros(4, 2), torch.zeros(4, 2), bandwidth=0.0),
     r"bandwidth.*got 0\.0"),
    ("TV probs not normalised", lambda: total_variation(torch.zeros(4, 2), torch.full((4,), 0.1)),
     r"probs must sum to 1 \(got 0\.4"),
    ("TV samples 0.5", lambda: total_variation(torch.full((4, 2), 0.5), torch.full((4,), 0.25)),
     r"samples.*\{0, 1\}"),
    ("KL NaN probs", lambda: kl_divergence(torch.zeros(4, 2), torch.tensor([NAN, 0.5, 0.25, 0.25])),
     r"probs must be finite"),
    ("ESS NaN", lambda: effective_sample_size(torch.tensor([NAN, 0.0])), r"log_weights.*NaN"),
    ("ESS all -inf", lambda: effective_sample_size(torch.full((3,), -INF)), r"all log_weights are -inf"),
    ("ESS empty", lambda: effective_sample_size(torch.zeros(0)), r"log_weights is empty"),
    ("mode_weights means shape", lambda: mode_weights(torch.zeros(4, 2), torch.zeros(3, 3)),
     r"means.*\(3, 3\)"),
    # data
    ("toy name", lambda: toy_2d("foo", 10), r"unknown toy data set 'foo'"),
    ("toy n 0", lambda: toy_2d("8gaussians", 0), r"n must be a positive int, got 0"),
    ("gray bits 0", lambda: gray_encode(torch.zeros(4, 2), bits=0), r"bits.*got 0"),
    ("gray NaN", lambda: gray_encode(torch.full((4, 2), NAN)), r"x contains NaN"),
    ("gray_decode 0.5", lambda: gray_decode(torch.full((4, 32), 0.5)), r"code.*0 and 1"),
    ("gray_decode width", lambda: gray_decode(torch.zeros(4, 31)), r"code.*\(4, 31\)"),
    # discrete flows
    ("MixturePath K=1", lambda: MixturePath(1), r"num_classes.*got 1"),
    ("MixturePath source", lambda: MixturePath(3, source="foo"), r"source.*'foo'"),
    ("PolynomialSchedule NaN", lambda: PolynomialSchedule(NAN), r"exponent.*got nan"),
    ("CTMCSolver step 0", lambda: CTMCSolver(MixturePath(2), dt=0.0), r"dt.*got 0\.0"),
    ("MLPVelocity dim 0", lambda: MLPVelocity(0), r"dim.*got 0"),
    # flows
    ("RealNVP n_layers 0", lambda: RealNVP(2, n_layers=0), r"n_layers.*got 0"),
    ("RealNVP log_prob shape", lambda: _flow().log_prob(torch.zeros(4, 3)), r"x must have shape \(B, 2\).*\(4, 3\)"),
    ("ContinuousFlow method", lambda: ContinuousFlow(2, method="foo"), r"method.*'foo'"),
    ("FlowMC dim mismatch", lambda: FlowMC(_flow(3)).sample(_mlp(C2), 4), r"dim=3.*Continuous\(2\)"),
    ("FlowMC n_global -1", lambda: FlowMC(_flow(), n_global=-1), r"n_global.*got -1"),
    ("importance_weights shapes", lambda: importance_weights(torch.zeros(4), torch.zeros(3)),
     r"log_q \(3,\)"),
    ("importance_weights temperature 0",
     lambda: importance_weights(torch.zeros(4), torch.zeros(4), temperature=0.0),
     r"temperature.*got 0\.0"),
]


@pytest.mark.parametrize(("call", "pattern"), [pytest.param(c, p, id=i) for i, c, p in CASES])
def test_bad_input_gives_a_value_error_naming_it(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# -- faults found by the audit and fixed (kept as regression tests) ------------------------------
FIXED = [
    ("dula-step-inf", lambda: DiscreteLangevin(INF), r"step_size must be a positive finite.*inf"),
    ("mala-float64-x0", lambda: MALA(0.1).run(_mlp(C2), torch.zeros(4, 2, dtype=torch.float64), 2),
     r"x0 has dtype torch.float64"),
    ("ed-empty-batch", lambda: ED()(_mlp(C2), torch.zeros(0, 2)), r"data is an empty batch.*B >= 1"),
    ("cd-empty-batch", lambda: ContrastiveDivergence()(_mlp(C2), torch.zeros(0, 2), Langevin()),
     r"data is an empty batch.*B >= 1"),
]


@pytest.mark.parametrize(("call", "pattern"), [pytest.param(c, p, id=i) for i, c, p in FIXED])
def test_audited_faults_now_raise_clear_errors(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_energy_forward_diagnosis_costs_nothing_on_the_happy_path():
    """The checks run only after the network failed: a valid call reads no values."""
    energy = _mlp(K33)
    x = torch.randint(0, 3, (5, 3))
    assert energy(x).shape == (5,)
    assert energy(K33.one_hot(x).float()).shape == (5,)
    assert math.isfinite(float(energy(x).detach().sum()))
