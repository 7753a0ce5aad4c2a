"""Data: 2-D toy data sets, their binary (Gray code) and categorical (base-K) discretisations,
and small binary image sets (scikit-learn's 8x8 digits, a local binarized MNIST).

Depends on nothing else in ebmflow; scikit-learn is imported only inside ``digits``.
"""

from .encoding import (
    base_decode,
    base_encode,
    bits_to_int,
    gray_decode,
    gray_encode,
    gray_to_int,
    int_to_bits,
    int_to_gray,
    quantisation_bound,
)
from .images import MNIST_SPLITS, binarized_mnist, digits
from .toy import TOY_DATASETS, TOY_MIXTURES, toy_2d

__all__ = [
    "toy_2d",
    "TOY_DATASETS",
    "TOY_MIXTURES",
    "gray_encode",
    "gray_decode",
    "int_to_gray",
    "gray_to_int",
    "int_to_bits",
    "bits_to_int",
    "base_encode",
    "base_decode",
    "quantisation_bound",
    "digits",
    "binarized_mnist",
    "MNIST_SPLITS",
]
