"""Spaces: validation errors name the problem, noise has the right law, one-hot round trip."""

from __future__ import annotations

import pytest
import torch

from ebmflow.spaces import Binary, Categorical, Continuous


def test_continuous_noise_shape_dtype_and_moments(gen):
    s = Continuous(3)
    x = s.noise(20000, generator=gen)
    assert x.shape == (20000, 3) and x.dtype == torch.float32
    # mean 0, var 1 within 5 standard errors
    assert x.mean(0).abs().max() < 5 / 20000**0.5
    assert (x.var(0) - 1).abs().max() < 5 * (2 / 20000) ** 0.5
    assert s.validate(x) is x


def test_image_space_shape():
    s = Continuous((1, 4, 4))
    assert s.dim == 16
    assert s.noise(2).shape == (2, 1, 4, 4)


def test_noise_is_deterministic_under_generator():
    for s in (Continuous(2), Binary(5), Categorical(4, 3)):
        a = s.noise(7, generator=torch.Generator().manual_seed(3))
        b = s.noise(7, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


def test_binary_noise_is_fair(gen):
    x = Binary(8).noise(20000, generator=gen)
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert (x.mean(0) - 0.5).abs().max() < 5 * 0.5 / 20000**0.5


def test_categorical_noise_and_one_hot_round_trip(gen):
    s = Categorical(4, 5)
    x = s.noise(1000, generator=gen)
    assert x.dtype == torch.long and int(x.min()) >= 0 and int(x.max()) < 5
    oh = s.one_hot(x)
    assert oh.shape == (1000, 4, 5) and oh.dtype == torch.float32
    assert torch.equal(s.from_one_hot(oh), x)
    assert s.one_hot(oh) is oh
    assert s.is_one_hot(oh) and not s.is_one_hot(x)


@pytest.mark.parametrize(
    "space, x, match",
    [
        (Continuous(2), torch.zeros(4, 3), r"shape \(4, 3\).*expects \(B, 2\)"),
        (Continuous(2), torch.zeros(4), r"shape \(4,\)"),
        (Continuous(2), torch.zeros(0, 2), "empty batch"),
        (Continuous(2), torch.zeros(4, 2, dtype=torch.long), "floating dtype"),
        (Continuous(2), torch.tensor([[0.0, float("nan")]]), "NaN or inf"),
        (Continuous(2), torch.tensor([[0.0, float("inf")]]), "NaN or inf"),
        (Binary(3), torch.tensor([[0.0, 1.0, 0.5]]), r"0.5 outside \{0, 1\}"),
        (Binary(3), torch.tensor([[0, 1, 1]]), "expects float states"),
        (Categorical(2, 3), torch.tensor([[0, 3]]), r"3 outside \[0, 3\)"),
        (Categorical(2, 3), torch.tensor([[0, -1]]), r"-1 outside"),
        (Categorical(2, 3), torch.tensor([[0.0, 1.0]]), "expects long class indices"),
    ],
)
def test_validate_names_the_problem(space, x, match):
    with pytest.raises(ValueError, match=match):
        space.validate(x)


def test_validate_rejects_non_tensor_and_wrong_device():
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        Continuous(2).validate([[0.0, 1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is on device cpu but the model is on meta"):
        Continuous(2).validate(torch.zeros(1, 2), device="meta")


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_noise_rejects_bad_n(bad):
    with pytest.raises(ValueError, match="n must be a positive int"):
        Continuous(2).noise(bad)


def test_bad_space_arguments():
    with pytest.raises(ValueError):
        Continuous(0)
    with pytest.raises(ValueError):
        Binary(-3)
    with pytest.raises(ValueError, match="num_classes"):
        Categorical(3, 1)


def test_space_equality():
    assert Continuous(2) == Continuous((2,))
    assert Binary(3) != Binary(4)
    assert Categorical(3, 4) == Categorical(3, 4)
    assert Categorical(3, 4) != Binary(3)
