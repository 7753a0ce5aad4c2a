"""Small binary image data sets: scikit-learn's bundled 8x8 digits and a local binarized MNIST.

Nothing here downloads anything. ``digits`` needs scikit-learn (the ``data`` extra, imported
only when called); ``binarized_mnist`` reads a file the user already has.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["digits", "binarized_mnist", "MNIST_SPLITS"]

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0

MNIST_SPLITS = ("train", "valid", "test")

_MNIST_HELP = (
    "binarized MNIST is not bundled and never downloaded by ebmflow. Get the standard "
    "fixed binarisation (Larochelle & Murray 2011: binarized_mnist_train.amat, "
    "binarized_mnist_valid.amat, binarized_mnist_test.amat; 50,000 / 10,000 / 10,000 rows of 784 "
    "space-separated 0/1 values) or an .npz with arrays 'train', 'valid', 'test' (or 'x_train', "
    "'x_valid'/'x_val', 'x_test') of shape (N, 784) or (N, 28, 28) in {0, 1}, and pass its path "
    "(the .npz / .amat file, or the folder holding the three .amat files)"
)


def digits(
    binarize: bool = True,
    split: str = "train",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""scikit-learn's bundled 8x8 handwritten digits (1,797 images), flattened.

    Args:
        binarize: True: a pixel (0 to 16) becomes 1 if $\text{pixel} \ge 8$, else 0; False:
            $\text{pixel} / 16 \in [0, 1]$.
        split: "train" (80%, 1,438 images), "test" (20%, 359 images) or "all". The split is a
            fixed permutation (seed 0), the same on every machine and call.
        generator: if given, the returned rows are shuffled with it; otherwise they keep the
            split's fixed order.

    Returns:
        ``(x, labels)``: float32 ``(N, 64)`` (values in $\{0, 1\}$ or $[0, 1]$) and long
        ``(N,)``.

    Raises:
        ImportError: scikit-learn is missing (install ``ebmflow[data]``).
        ValueError: unknown ``split``.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ebmflow.data.digits needs scikit-learn; install it with `pip install ebmflow[data]` "
            "(or `pip install scikit-learn`)"
        ) from err
    bunch = load_digits()
    pixels = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32))
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    n = pixels.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    n_test = round(_DIGITS_TEST_FRACTION * n)
    if split == "train":
        order = order[n_test:]
    elif split == "test":
        order = order[:n_test]
    if generator is not None:
        order = order[
            torch.randperm(order.numel(), generator=generator, device=generator.device).cpu()
        ]
    x = pixels[order]
    x = (x >= 8).float() if binarize else x / 16.0
    return x, labels[order]


def binarized_mnist(path: str | os.PathLike, split: str = "train") -> Tensor:
    r"""Load a local copy of binarized MNIST as float32 ``(N, 784)`` in $\{0, 1\}$.

    Supported formats:

    * ``.npz`` with arrays ``train``/``valid``/``test`` or ``x_train``/``x_valid`` (or
      ``x_val``)/``x_test``, each ``(N, 784)`` or ``(N, 28, 28)`` with values in $\{0, 1\}$;
    * the classic text files ``binarized_mnist_{train,valid,test}.amat`` (one image per line,
      784 space-separated 0/1 values): pass the file itself or the folder that holds them.

    Args:
        path: the .npz or .amat file, or a folder with ``binarized_mnist_<split>.amat`` (or a
            single ``binarized_mnist.npz``).
        split: "train", "valid" (alias "val") or "test".

    Raises:
        FileNotFoundError: nothing usable at ``path`` (the message says where to get the data
            and which formats are read). No network access is ever attempted.
        ValueError: unknown ``split``, a missing array in the .npz, or values/shape that are
            not binarized MNIST.
    """
    split = "valid" if split == "val" else split
    if split not in MNIST_SPLITS:
        raise ValueError(f"split must be one of {MNIST_SPLITS} (or 'val'), got {split!r}")
    file = _resolve_mnist_file(Path(path), split)
    if file.suffix == ".npz":
        array = _read_npz_split(file, split)
    else:
        array = np.loadtxt(file, dtype=np.float32, ndmin=2)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(array.shape[0], -1)
    if x.shape[1] != 784:
        raise ValueError(f"{file}: expected 784 pixels per image, got shape {tuple(array.shape)}")
    if bool(((x != 0) & (x != 1)).any()):
        raise ValueError(f"{file}: values must be 0 or 1 (binarized MNIST); got other values")
    return x


def _resolve_mnist_file(path: Path, split: str) -> Path:
    if path.is_dir():
        for candidate in (path / f"binarized_mnist_{split}.amat", path / "binarized_mnist.npz"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"no binarized_mnist_{split}.amat or binarized_mnist.npz in folder {path}; "
            + _MNIST_HELP
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; " + _MNIST_HELP)
    if path.suffix not in (".npz", ".amat"):
        raise FileNotFoundError(f"{path} is neither .npz nor .amat; " + _MNIST_HELP)
    return path


def _read_npz_split(file: Path, split: str) -> np.ndarray:
    keys = {
        "train": ("train", "x_train"),
        "valid": ("valid", "x_valid", "x_val", "val"),
        "test": ("test", "x_test"),
    }[split]
    with np.load(file, allow_pickle=False) as archive:
        for key in keys:
            if key in archive.files:
                return archive[key]
        raise ValueError(
            f"{file} has no array for split {split!r}: looked for {keys}, found {archive.files}"
        )
