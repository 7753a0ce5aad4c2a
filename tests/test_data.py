"""Tests of ebmflow.data: toy sets, Gray / base-K codes, digits and the binarized-MNIST loader."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from ebmflow.data import (
    TOY_DATASETS,
    TOY_MIXTURES,
    base_decode,
    base_encode,
    binarized_mnist,
    digits,
    gray_decode,
    gray_encode,
    gray_to_int,
    int_to_gray,
    quantisation_bound,
    toy_2d,
)
from ebmflow.energy import GaussianMixtureEnergy


# -- toy data sets --------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_shape_range_and_determinism(name):
    x = toy_2d(name, 2000, torch.Generator().manual_seed(1))
    assert x.shape == (2000, 2) and x.dtype == torch.float32
    assert bool(torch.isfinite(x).all())
    limit = torch.tensor([9.0, 5.0]) if name == "two_modes" else torch.tensor([4.5, 4.5])
    assert bool((x.abs().quantile(0.999, dim=0) < limit).all())
    assert x.std(0).min() > 0.5  # not collapsed
    again = toy_2d(name, 2000, torch.Generator().manual_seed(1))
    assert torch.equal(x, again)
    assert not torch.equal(x, toy_2d(name, 2000, torch.Generator().manual_seed(2)))


def test_toy_bad_input():
    with pytest.raises(ValueError, match="swissroll.*checkerboard"):
        toy_2d("spiral", 10)
    with pytest.raises(ValueError, match="positive int"):
        toy_2d("moons", 0)


def _sklearn_reference(name: str, n: int) -> torch.Tensor:
    """The literature's generators (FFJORD toy_data), built on scikit-learn."""
    datasets = pytest.importorskip("sklearn.datasets")
    if name == "swissroll":
        x = datasets.make_swiss_roll(n_samples=n, noise=1.0, random_state=0)[0][:, [0, 2]] / 5
    elif name == "circles":
        x = datasets.make_circles(n_samples=n, factor=0.5, noise=0.08, random_state=0)[0] * 3
    else:
        x = datasets.make_moons(n_samples=n, noise=0.1, random_state=0)[0] * 2 + [-1, -0.2]
    return torch.as_tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("name", ["swissroll", "circles", "moons"])
def test_toy_matches_sklearn_definition(name):
    n = 20000
    ours = toy_2d(name, n, torch.Generator().manual_seed(0)).double()
    ref = _sklearn_reference(name, n)
    # first and second moments agree within 5 Monte Carlo standard errors
    for f in (lambda z: z, lambda z: z**2, lambda z: z[:, :1] * z[:, 1:]):
        a, b = f(ours), f(ref)
        se = ((a.var(0) + b.var(0)) / n).sqrt()
        assert bool(((a.mean(0) - b.mean(0)).abs() < 5 * se + 1e-9).all())


def test_toy_structural_properties():
    gen = torch.Generator().manual_seed(0)
    board = toy_2d("checkerboard", 5000, gen) / 2
    assert bool(((board.floor().sum(-1) % 2) == 0).all())  # only "black" cells
    r = toy_2d("rings", 5000, gen).norm(dim=-1)
    ring = (r / 0.8).round()
    assert set(ring.long().unique().tolist()) == {1, 2, 3, 4}
    assert float((r - 0.8 * ring).abs().max()) < 0.3


@pytest.mark.parametrize("name", ["8gaussians", "25gaussians", "two_modes"])
def test_toy_mixtures_describe_the_samples(name):
    n = 40000
    x = toy_2d(name, n, torch.Generator().manual_seed(0)).double()
    gmm = GaussianMixtureEnergy(*TOY_MIXTURES[name]).double()
    # exact mean and covariance of the mixture vs the sample (5 standard errors)
    se_mean = (gmm.covariance().diagonal() / n).sqrt()
    assert bool(((x.mean(0) - gmm.mean()).abs() < 5 * se_mean).all())
    cov = torch.cov(x.T)
    assert torch.allclose(cov, gmm.covariance(), atol=0.06 * float(gmm.covariance().abs().max()))
    # the responsibilities-weighted counts match the weights
    w = gmm.responsibilities(x).mean(0)
    se_w = (gmm.weights * (1 - gmm.weights) / n).sqrt()
    assert bool(((w - gmm.weights).abs() < 5 * se_w).all())


def test_toy_mixture_values():
    means, scale, weights = TOY_MIXTURES["two_modes"]
    assert means == ((-4.0, 0.0), (4.0, 0.0)) and scale == 1.0
    assert weights == pytest.approx((2 / 3, 1 / 3))
    means8, scale8, _ = TOY_MIXTURES["8gaussians"]
    assert math.hypot(*means8[0]) == pytest.approx(4 / 1.414)
    assert scale8 == pytest.approx(0.5 / 1.414)
    assert len(TOY_MIXTURES["25gaussians"][0]) == 25
    with pytest.raises(TypeError):
        TOY_MIXTURES["new"] = TOY_MIXTURES["two_modes"]  # read-only


# -- Gray code ------------------------------------------------------------------------------
def test_int_gray_round_trip_and_adjacency():
    q = torch.arange(2**16)
    g = int_to_gray(q)
    assert torch.equal(gray_to_int(g), q)
    assert g.unique().numel() == 2**16  # a bijection
    diff = g[1:] ^ g[:-1]
    assert bool(((diff & (diff - 1)) == 0).all())  # neighbours differ in exactly one bit
    with pytest.raises(ValueError, match="integer"):
        int_to_gray(torch.ones(3))


def _reference_bits(v: float, bound: float = 6.0) -> str:
    """Hand implementation of the literature's code: sign + 15-bit Gray of int(|v| 2^15 / bound)."""
    q = int(abs(v) * 2**15 / bound)
    return ("1" if v < 0 else "0") + format(q ^ (q >> 1), "015b")


def test_gray_encode_matches_reference():
    x = torch.tensor([[1.0, -0.5], [3.99, 0.0], [-2.2, 5.9]])
    code = gray_encode(x)
    assert code.shape == (3, 32) and code.dtype == torch.float32
    for row, point in zip(code, x.tolist()):
        expected = "".join(_reference_bits(v) for v in point)
        assert "".join(str(int(b)) for b in row.tolist()) == expected


def test_gray_round_trip_exact_on_grid():
    gen = torch.Generator().manual_seed(0)
    bits = (torch.rand(5000, 32, generator=gen) < 0.5).float()
    centres = gray_decode(bits)
    assert torch.equal(gray_encode(centres), bits)  # every bit pattern survives
    assert torch.equal(gray_decode(gray_encode(centres)), centres)  # grid points are fixed
    x = toy_2d("8gaussians", 2000, gen)
    err = (gray_decode(gray_encode(x)) - x).abs().max()
    assert float(err) <= 0.5 * 6.0 / 2**15 + 1e-6
    # other widths and bounds, e.g. 8 bits per coordinate on [-3, 3)
    small = (torch.rand(100, 24, generator=gen) < 0.5).float()
    assert torch.equal(gray_encode(gray_decode(small, 8, 3.0), 8, 3.0), small)


def test_gray_clamps_and_bad_input():
    far = gray_decode(gray_encode(torch.tensor([[100.0, -100.0]])))
    last = (2**15 - 0.5) * 6.0 / 2**15
    assert far.tolist() == [[pytest.approx(last), pytest.approx(-last)]]
    assert quantisation_bound(torch.tensor([[3.0, -4.0]])) == 6.0
    with pytest.raises(ValueError, match="NaN"):
        gray_encode(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="0 and 1"):
        gray_decode(torch.full((2, 32), 0.5))
    with pytest.raises(ValueError, match="d \\* 16"):
        gray_decode(torch.zeros(2, 30))
    with pytest.raises(ValueError, match="bound"):
        gray_encode(torch.zeros(2, 2), bound=0.0)


# -- base-K code ----------------------------------------------------------------------------
def test_base_encoding_by_hand_and_round_trip():
    x = torch.tensor([[0.0, -6.0]])
    code = base_encode(x)  # K = 5, 8 digits on [-6, 6)
    assert code.shape == (1, 16) and code.dtype == torch.long
    q = (0.0 + 6.0) / 12.0 * 5**8  # 195312.5 -> 195312
    digits_expected = [int(q) // 5 ** (7 - j) % 5 for j in range(8)]
    assert code[0, :8].tolist() == digits_expected
    assert code[0, 8:].tolist() == [0] * 8
    gen = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 5, (1000, 16), generator=gen)
    assert torch.equal(base_encode(base_decode(pattern)), pattern)
    pts = toy_2d("moons", 1000, gen)
    assert float((base_decode(base_encode(pts)) - pts).abs().max()) <= 0.5 * 12.0 / 5**8 + 1e-6
    with pytest.raises(ValueError, match="num_classes"):
        base_encode(pts, num_classes=1)
    with pytest.raises(ValueError, match="\\[0, 5\\)"):
        base_decode(torch.full((2, 16), 7))


# -- digits ---------------------------------------------------------------------------------
def test_digits_splits_and_values():
    pytest.importorskip("sklearn")
    x, y = digits()
    xt, yt = digits(split="test")
    xa, ya = digits(split="all")
    assert x.shape == (1438, 64) and xt.shape == (359, 64) and xa.shape == (1797, 64)
    assert x.dtype == torch.float32 and y.dtype == torch.long
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert int(y.min()) == 0 and int(y.max()) == 9
    rows = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert rows(torch.cat([x, xt])) == rows(xa)  # the split is a partition
    assert torch.equal(digits()[0], x)  # deterministic
    grey, _ = digits(binarize=False, split="test")
    assert float(grey.min()) == 0.0 and float(grey.max()) == 1.0
    assert torch.equal((grey * 16 >= 8).float(), xt)
    shuffled, ys = digits(generator=torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled, x) and rows(shuffled) == rows(x)
    with pytest.raises(ValueError, match="split"):
        digits(split="valid")


# -- binarized MNIST loader -----------------------------------------------------------------
def _fake_mnist(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 784)) < 0.3).astype(np.float32)


def test_binarized_mnist_npz_and_amat(tmp_path):
    arrays = {"train": _fake_mnist(5, 0), "valid": _fake_mnist(3, 1), "test": _fake_mnist(4, 2)}
    np.savez(tmp_path / "mnist.npz", **arrays)
    np.savez(
        tmp_path / "keras.npz",
        x_train=arrays["train"].reshape(5, 28, 28),
        x_val=arrays["valid"],
        x_test=arrays["test"],
    )
    folder = tmp_path / "amat"
    folder.mkdir()
    for split, arr in arrays.items():
        np.savetxt(folder / f"binarized_mnist_{split}.amat", arr, fmt="%d")
    for split, arr in arrays.items():
        for path in (
            tmp_path / "mnist.npz",
            tmp_path / "keras.npz",
            folder,
            folder / f"binarized_mnist_{split}.amat",
        ):
            x = binarized_mnist(path, split=split)
            assert x.dtype == torch.float32 and x.shape == arr.shape
            assert torch.equal(x, torch.from_numpy(arr))
    assert binarized_mnist(folder, split="val").shape == (3, 784)


def test_binarized_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="binarized_mnist_train.amat"):
        binarized_mnist(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        binarized_mnist(tmp_path)  # empty folder
    np.savez(tmp_path / "bad.npz", train=np.full((2, 784), 0.5), test=np.zeros((2, 100)))
    with pytest.raises(ValueError, match="0 or 1"):
        binarized_mnist(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="784"):
        binarized_mnist(tmp_path / "bad.npz", split="test")
    with pytest.raises(ValueError, match="valid"):
        binarized_mnist(tmp_path / "bad.npz", split="valid")
    with pytest.raises(ValueError, match="split"):
        binarized_mnist(tmp_path / "bad.npz", split="dev")


def test_import_is_light():
    code = (
        "import sys, ebmflow.data; "
        "bad = [m for m in ('matplotlib', 'sklearn') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
