"""Fashion-MNIST from its IDX gzip files (spec ``fashion-mnist[:train|test|fit|val]``)."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .arrays import GrayArraySource
from .images import FETCH_HINT, DamagedSet, data_root
from .spec import Spec, register_source
from .splits import SPLITS, inner_split

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip or raw) of unsigned bytes into a numpy array; ``ValueError`` when it
    is cut short, no gzip or no IDX file."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except EOFError:
        raise ValueError(f"{path}: cut short (the gzip stream ends early)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: not a readable gzip file ({e})") from None
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{dtype_code:02x} unsupported (expected 0x08, unsigned byte)")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header says {dims} but holds {arr.size} values")
    return arr.reshape(dims)


class FashionMNIST(GrayArraySource):
    """Fashion-MNIST from its IDX gzip files: 60,000 train / 10,000 test, 28×28 gray (as RGB).

    ``root`` defaults to ``$M3I_DATA/fashion-mnist`` (``~/.cache/m3i/fashion-mnist`` without
    ``M3I_DATA``) when present, else the Debian package's ``/usr/share/datasets/fashion-mnist``.
    """

    PREFIX = {"train": "train", "test": "t10k", "fit": "train", "val": "train"}
    N_VAL = 10_000

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train",
                 labels: bool = True, captions: bool = True, name: str | None = None):
        super().__init__(labels=labels, captions=captions, name=name or f"fashion-mnist:{split}")
        if split not in self.PREFIX:
            raise ValueError(f"Fashion-MNIST split must be one of {', '.join(self.PREFIX)}, got {split!r}")
        self.split = split
        self.root = self._find_root(root)
        p = self.PREFIX[split]
        images = self._file(f"{p}-images-idx3-ubyte")
        labels_file = self._file(f"{p}-labels-idx1-ubyte")
        self.images, self.targets = self._read(images, labels_file)
        # fit / val: the seeded inner split of the official train set (m3i.data.splits)
        self.file_index = (inner_split(len(self.images), split, self.N_VAL) if split in ("fit", "val")
                           else np.arange(len(self.images)))
        self.images, self.targets = self.images[self.file_index], self.targets[self.file_index]
        self._images_file = images
        self._require_samples(len(self.images), f"{images} holds no image")
        self._class_names = list(FASHION_MNIST_CLASSES)

    def _read(self, images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
        """The images and labels of two IDX files; a damaged file is one line naming it."""
        try:
            x, y = read_idx(images), read_idx(labels).astype(np.int64)
        except ValueError as e:
            raise DamagedSet(None, str(e), "fashion-mnist") from None
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DamagedSet(images, f"expected N×H×W images matching {labels.name}'s labels, got {x.shape} and {y.shape}",
                          "fashion-mnist")
        if y.size and not 0 <= y.min() <= y.max() < len(FASHION_MNIST_CLASSES):
            raise DamagedSet(labels, f"labels must lie in 0..9, got {y.min()}..{y.max()}", "fashion-mnist")
        return x, y

    def _find_root(self, root) -> Path:
        expected = "train-/t10k-{images-idx3,labels-idx1}-ubyte.gz"
        if root is not None:
            r = Path(root).expanduser()
            if not r.is_dir():
                raise FileNotFoundError(
                    f"Fashion-MNIST folder {str(r)!r} not found: expected the IDX files {expected}; {FETCH_HINT}"
                )
            return r
        candidates = [data_root() / "fashion-mnist", FASHION_MNIST_SYSTEM_DIR]
        for c in candidates:
            if (c / f"{self.PREFIX[self.split]}-images-idx3-ubyte.gz").is_file():
                return c
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {', '.join(map(str, candidates))}: expected the IDX files "
            f"{expected}; {FETCH_HINT} (or apt-get install dataset-fashion-mnist)"
        )

    def _file(self, stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (self.root / name).is_file():
                return self.root / name
        raise FileNotFoundError(
            f"Fashion-MNIST file {str(self.root / (stem + '.gz'))!r} not found: expected the four IDX "
            f"gzip files there; {FETCH_HINT}"
        )


@register_source("fashion-mnist", "fashion-mnist[:train|test|fit|val]", aliases=("fashion_mnist", "fashionmnist"),
                 evaluated=("fashion-mnist",), monitored=("fashion-mnist", None))
def _build(spec: Spec) -> FashionMNIST:
    split = (spec.arg or "train").strip().lower()
    if split not in SPLITS:
        raise spec.error(f"Fashion-MNIST split must be one of {', '.join(SPLITS)}, got {split!r}")
    return FashionMNIST(split=split, **spec.common)
