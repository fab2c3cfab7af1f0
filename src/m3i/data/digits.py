"""The UCI handwritten digits, 8×8 gray (spec ``digits[:train|test|fit|val|all]``)."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from .arrays import GrayArraySource
from .images import FETCH_HINT, DamagedSet, data_root
from .spec import Spec, register_source
from .splits import SPLITS, grouped_split


class Digits(GrayArraySource):
    """The UCI handwritten digits (1,797 images, 8×8, 17 grey levels, classes 0–9), from
    ``$M3I_DATA/digits/digits.csv.gz`` (``m3i data fetch digits``). No built-in mix
    pre-trains on them: they are the check on an image kind a backbone never saw. ``split`` is
    ``train``, ``test``, ``fit`` or ``val`` of :mod:`m3i.data.splits` (seeded 80/20)."""

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", labels: bool = True,
                 captions: bool = True, name: str | None = None):
        if split not in SPLITS:
            raise ValueError(f"digits split must be one of {', '.join(SPLITS)}, got {split!r}")
        super().__init__(labels=labels, captions=captions, name=name or f"digits:{split}")
        self.path = (Path(root).expanduser() if root is not None else data_root() / "digits") / "digits.csv.gz"
        if not self.path.is_file():
            raise FileNotFoundError(f"digits not found at {str(self.path)!r}; {FETCH_HINT}")
        rows = self._rows()
        keep = grouped_split(range(len(rows)), split)
        self.file_index, self._images_file = keep, self.path
        self.images = np.round(rows[keep, :64] * (255 / 16)).clip(0, 255).astype(np.uint8).reshape(-1, 8, 8)
        self.targets = rows[keep, 64].astype(np.int64)
        self._require_samples(len(self.images), f"the {split!r} split of {self.path} is empty")
        self._class_names = [str(d) for d in range(10)]


    def _rows(self) -> np.ndarray:
        """The file's rows: 64 pixel values (0..16) and a label (0..9) each; a damaged file is one line."""
        try:
            with gzip.open(self.path, "rt") as f:
                rows = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
        except EOFError:
            raise DamagedSet(self.path, "cut short: the gzip stream ends early", "digits") from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise DamagedSet(self.path, f"not a readable gzip file ({e})", "digits") from None
        except ValueError as e:  # not UTF-8, not numbers
            raise DamagedSet(self.path, " ".join(str(e).split())[:160], "digits") from None
        if rows.shape[1] != 65:
            raise DamagedSet(self.path, f"expected rows of 64 pixel values and a label, got shape {rows.shape}", "digits")
        labels = rows[:, 64]
        if not (np.all(labels == np.round(labels)) and 0 <= labels.min() <= labels.max() <= 9):
            raise DamagedSet(self.path, "the last column (the label) must hold whole numbers 0..9", "digits")
        return rows


@register_source("digits", "digits[:train|test|fit|val|all]", evaluated=("digits",), monitored=("digits", None))
def _build(spec: Spec) -> Digits:
    split = (spec.arg or "train").strip().lower()
    if split not in SPLITS:
        raise spec.error(f"digits split must be one of {', '.join(SPLITS)}, got {split!r}")
    return Digits(split=split, **spec.common)
