"""Data layer: random-access sources, one module per format, built from short specs, and the
weighted, reproducible mixture of them."""

from .images import ImageUnreadable, data_root, decode_image

from .source import Source
from .spec import SPEC_FORMS, Spec, build_source, parse_spec, register_source
from .mixture import Mixture, SourceUnreadableError

# each format module registers its spec kind when imported: this order is the order of SPEC_FORMS
# isort: off
from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, read_idx
from .emoji import Emoji
from .digits import Digits
from .folder import ImageFolder
from .manifest import Manifest
from .shards import Shards
# isort: on

__all__ = [
    "FASHION_MNIST_CLASSES",
    "SPEC_FORMS",
    "Digits",
    "Emoji",
    "FashionMNIST",
    "ImageFolder",
    "ImageUnreadable",
    "Manifest",
    "Mixture",
    "Shards",
    "Source",
    "SourceUnreadableError",
    "Spec",
    "build_source",
    "data_root",
    "decode_image",
    "parse_spec",
    "read_idx",
    "register_source",
]
