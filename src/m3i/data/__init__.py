"""Data layer: random-access sources and the weighted, reproducible mixture of them."""

from .builtin import SPEC_FORMS, builtin_source, parse_spec
from .mixture import Mixture, SourceUnreadableError
from .sources import (
    FASHION_MNIST_CLASSES,
    Digits,
    Emoji,
    FashionMNIST,
    ImageFolder,
    Manifest,
    Shards,
    Source,
    data_root,
    decode_image,
    read_idx,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "SPEC_FORMS",
    "Digits",
    "Emoji",
    "FashionMNIST",
    "ImageFolder",
    "Manifest",
    "Mixture",
    "Shards",
    "Source",
    "SourceUnreadableError",
    "builtin_source",
    "data_root",
    "decode_image",
    "parse_spec",
    "read_idx",
]
