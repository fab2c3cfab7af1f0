"""One seeded split of every built-in data set, used by the data sources and by evaluation.

Split names:

- ``train`` / ``test``: what a backbone may see in pre-training, and what evaluation scores.
  Fashion-MNIST keeps its official split (60,000 / 10,000). Emoji has none, so a seeded 20 %
  of the base emoji is ``test``; emoji that share a caption always fall on the same side, so
  no test caption is ever a training caption.
- ``all``: every item, for pre-training on a set that is not also evaluated on.
- ``fit`` / ``val``: an inner split of ``train`` for choices (tuning, early stopping): ``val``
  is a seeded 10,000 images of Fashion-MNIST train, and a seeded 20 % of the emoji train part.

A test item is never a training sample, labelled or not: ``fit`` and ``val`` lie inside
``train``, and ``train`` and ``test`` are disjoint.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLIT_SEED = 0
SPLITS = ("train", "test", "fit", "val", "all")
TEST_FRACTION = 0.2
VAL_FRACTION = 0.2


def _groups_split(keys: Sequence, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices 0..len(keys)-1 -> (kept, held out); a seeded ``fraction`` of the distinct keys is
    held out, and every index with a held-out key goes with it."""
    keys = list(keys)
    distinct = list(dict.fromkeys(keys))  # first-appearance order: independent of hashing
    perm = np.random.default_rng(seed).permutation(len(distinct))
    n_out = int(round(fraction * len(distinct)))
    out_keys = {distinct[k] for k in perm[:n_out]}
    held = np.array([i for i, k in enumerate(keys) if k in out_keys], dtype=np.int64)
    kept = np.array([i for i, k in enumerate(keys) if k not in out_keys], dtype=np.int64)
    return kept, held


def grouped_split(keys: Sequence, split: str, test_fraction: float = TEST_FRACTION,
                  val_fraction: float = VAL_FRACTION) -> np.ndarray:
    """Indices of ``split`` for a data set with no official split, grouped by ``keys`` (e.g.
    captions): ``train``/``test`` split the groups, ``fit``/``val`` split the train groups."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all":
        return np.arange(len(keys))
    train, test = _groups_split(keys, test_fraction, SPLIT_SEED)
    if split in ("train", "test"):
        return train if split == "train" else test
    fit, val = _groups_split([keys[i] for i in train], val_fraction, SPLIT_SEED + 1)
    return train[fit] if split == "fit" else train[val]


def inner_split(n_train: int, split: str, n_val: int) -> np.ndarray:
    """``fit`` / ``val`` indices inside an official train split of ``n_train`` items."""
    if split not in ("fit", "val"):
        raise ValueError(f"inner split must be 'fit' or 'val', got {split!r}")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n_train)
    return np.sort(perm[n_val:] if split == "fit" else perm[:n_val])
