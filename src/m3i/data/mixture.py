"""Weighted mixture of sources as a stream of collated, reproducible batches.

The global batch of step ``s`` is a pure function of ``(seed, s)``: a numpy Generator seeded
from those two numbers picks, for each of its ``batch_size × world_size`` slots, a source (by
weight) and an index in it (with replacement); rank ``r`` reads the slots ``r·B … (r+1)·B - 1``.
The stream of global batches is therefore the same on any number of ranks, and a run resumed
on another world size (with the same global batch) continues it.

A read that fails with :class:`~m3i.data.images.ReadFailed` (an I/O error that may pass) is
tried again ``read_retries`` times, waiting ``retry_backoff · 2^attempt`` seconds. A sample
that still fails, or cannot be decoded, is replaced by the next index of its slot's own stream
(seeded from ``(seed, s, slot)``, same source): no other slot moves, and the replacement is
counted; the first ``NAMED`` of each source (per loader process) are named in a warning, with
what is wrong with each. A DataLoader worker ``w`` of ``W`` produces the steps ``s ≡ w (mod W)``
from ``start_step`` on, so the DataLoader's in-order output is step order whatever ``W`` is, and
resuming is setting ``start_step``.

Use it with ``DataLoader(mixture, batch_size=None, num_workers=W)``. Batches are
:class:`~m3i.batch.Batch` objects:

- ``images``: uint8 (B, 3, S, S), RGB, resized to S×S,
- ``labels``: long (B,), in the mixture's global label space (-1 for none),
- ``captions``: list of B ``str | None``,
- ``source``: long (B,), the index of each slot's source, ``index``: long (B,), the sample's
  index in it,
- ``step``: int; ``n_skipped``: int (unreadable samples met, each replaced), ``n_replaced``:
  int (slots whose planned sample was replaced), ``n_retries``: int (reads tried again).

With ``views`` set (a :class:`~m3i.views.loader.LoaderViews`, as training sets it), the images are
not resized to a square: each view is cropped from the decoded original, and the batch holds
``crops`` (one uint8 (B, 3, Sh, Sw) per view) and ``drawn`` (the views' parameters and masks)
instead of ``images``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..batch import Batch
from .images import ImageUnreadable, ReadFailed, warn_once
from .source import Source

log = logging.getLogger(__name__)

_STREAM_TAG = 0x6D3369  # separates the mixture's random streams from other users of the seed
_SLOT_TAG = 0x6D336A  # a slot's own stream of replacements
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


MIN_DRAWS = 32  # images drawn from a source before its lost fraction is judged
NAMED = 3  # unreadable images named in a warning, per source and loader process (all are counted)


class SourceUnreadableError(RuntimeError):
    """A source gave only unreadable images for ``max_failures`` draws in a row, or lost more
    than ``max_lost`` of its samples."""


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def unreadable_line(src, i: int, e: BaseException) -> str:
    """``FILE: what is wrong`` for sample ``i`` of ``src`` that failed with ``e``."""
    if isinstance(e, ImageUnreadable) and e.where:
        return " ".join(str(e).split())  # the file and what is wrong with it, whole
    return f"{src.locate(i)}: {type(e).__name__}: {_line(e)}"


class Mixture(IterableDataset):
    """Batches drawn from ``sources`` in proportion to ``weights``.

    Args:
        sources: the sources (objects with ``__len__``, ``get``, ``name``, ``num_classes``,
            ``class_names``, ``locate``, ``all_captions``; see :mod:`m3i.data.source`).
        weights: one non-negative weight per source (normalised); ``None`` for equal weights.
        batch_size: samples per batch (per rank); the global batch is ``batch_size × world_size``.
        image_size: side S of the square uint8 images.
        seed, rank, world_size: the global batch of step ``s`` depends on ``(seed, s)`` and its
            size only; this rank reads its slice of it.
        start_step: first step produced (set ``mixture.start_step = n`` to resume).
        num_steps: total steps of the run: steps ``start_step … num_steps - 1`` are produced
            (so resuming keeps the same end); ``None`` streams forever.
        max_failures: consecutive unreadable images within one slot before
            :class:`SourceUnreadableError` is raised.
        read_retries: further tries of a read that failed with ``ReadFailed``.
        retry_backoff: seconds before the first retry, doubled for each next one (``sleep``, an
            attribute, is the function that waits: ``time.sleep``).
        max_lost: the largest fraction of a source that may be lost: entries its index dropped
            (``source.num_dropped``, checked here) and images that fail to decode (checked as
            they are drawn, once ``MIN_DRAWS`` were drawn from it in this process). More raises
            :class:`SourceUnreadableError` naming the source.
        interpolation: PIL resampling for the resize, ``"bicubic"`` (default) or ``"bilinear"``
            (also ``"lanczos"``, ``"nearest"``).

    Labels: each source with labels gets its own range of the global label space, in source
    order: ``class_offsets[k]`` (``None`` for sources without labels), ``class_names`` (the
    sources' names concatenated) and ``num_classes``.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        weights: Sequence[float] | None,
        batch_size: int,
        image_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        start_step: int = 0,
        num_steps: int | None = None,
        max_failures: int = 100,
        read_retries: int = 3,
        retry_backoff: float = 0.1,
        max_lost: float = 1.0,
        interpolation: str = "bicubic",
    ):
        super().__init__()
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("Mixture needs at least one source")
        for src in self.sources:
            if len(src) == 0:
                raise ValueError(f"source {getattr(src, 'name', src)!r} has no usable sample")
        self.weights = self._normalised(weights)
        _check_args(batch_size, image_size, seed, rank, world_size, interpolation)
        self.batch_size = int(batch_size)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_step = int(start_step)
        self.num_steps = None if num_steps is None else int(num_steps)
        self.max_failures = int(max_failures)
        if not 0.0 <= float(max_lost) <= 1.0:
            raise ValueError(f"max_lost must be in [0, 1], got {max_lost}")
        self.max_lost = float(max_lost)
        self._check_dropped()
        self._draws = np.zeros(len(self.sources), dtype=np.int64)  # images drawn / lost / named, per source
        self._lost = np.zeros(len(self.sources), dtype=np.int64)
        self._named = np.zeros(len(self.sources), dtype=np.int64)
        self.interpolation = interpolation
        if int(read_retries) < 0 or not float(retry_backoff) >= 0:
            raise ValueError(f"read_retries and retry_backoff must be >= 0, got {read_retries}, {retry_backoff}")
        self.read_retries = int(read_retries)
        self.retry_backoff = float(retry_backoff)
        self.sleep = time.sleep
        self._lengths = np.asarray([len(src) for src in self.sources], dtype=np.int64)
        self._label_space()
        self._captions: list[str] | None = None
        self.views = None  # a LoaderViews: the batch's views made here, from the decoded originals
        # m3i sources accept a JPEG draft size; other objects with a plain get(i) work too
        self._draft = [isinstance(src, Source) for src in self.sources]

    def _normalised(self, weights: Sequence[float] | None) -> np.ndarray:
        if weights is None:
            weights = [1.0] * len(self.sources)
        w = np.asarray([float(x) for x in weights], dtype=np.float64)
        if w.shape != (len(self.sources),):
            raise ValueError(f"Mixture got {len(w)} weights for {len(self.sources)} sources")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"Mixture weights must be finite, >= 0 and not all 0, got {list(weights)}")
        return w / w.sum()

    def _check_dropped(self) -> None:
        """A source whose index dropped more than ``max_lost`` of its entries stops here, named."""
        for src in self.sources:
            dropped = int(getattr(src, "num_dropped", 0))
            if dropped and dropped / (dropped + len(src)) > self.max_lost:
                raise SourceUnreadableError(
                    f"source {src.name!r}: {dropped} of {dropped + len(src)} entries are unusable "
                    f"({dropped / (dropped + len(src)):.0%} > data.max_lost={self.max_lost:g}; first: "
                    f"{src.dropped[0] if getattr(src, 'dropped', None) else '?'}); fix them or raise data.max_lost")

    def _label_space(self) -> None:
        """Each labelled source's range of the global label space, in source order."""
        self.class_offsets: list[int | None] = []
        self.class_names: list[str] = []
        for src in self.sources:
            n = int(src.num_classes)
            if n > 0:
                self.class_offsets.append(len(self.class_names))
                self.class_names.extend(list(src.class_names))
            else:
                self.class_offsets.append(None)
        self._offsets = np.asarray([-1 if o is None else o for o in self.class_offsets], dtype=np.int64)

    # global label space ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_range(self, k: int) -> range:
        """Global labels of source ``k`` (empty when it has none)."""
        o = self.class_offsets[k]
        return range(0) if o is None else range(o, o + self.sources[k].num_classes)

    def captions(self) -> list[str]:
        """Unique non-empty captions over all sources with captions, in first-seen order
        (source order, then index order). Computed once."""
        if self._captions is None:
            seen: dict[str, None] = {}
            for src in self.sources:
                for c in src.all_captions():
                    seen.setdefault(c, None)
            self._captions = list(seen)
        return list(self._captions)

    # batches ---------------------------------------------------------------------------------
    def rng(self, step: int) -> np.random.Generator:
        """The generator behind the global batch of ``step``."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, int(step), _STREAM_TAG]))

    def slot_rng(self, step: int, slot: int) -> np.random.Generator:
        """The stream of replacements of slot ``slot`` of the global batch of ``step``."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, int(step), int(slot), _SLOT_TAG]))

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def global_plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Source and index of every slot of the global batch of ``step`` if no read fails."""
        g = self.rng(step)
        ks = g.choice(len(self.sources), size=self.global_batch_size, p=self.weights)
        return ks, g.integers(0, self._lengths[ks])

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Source and index of this rank's slots of ``step`` if no read fails."""
        ks, idx = self.global_plan(step)
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return ks[rows], idx[rows]

    def batch(self, step: int) -> Batch:
        """This rank's part of the global batch of ``step`` (a pure function of seed, step and
        the slots it holds, whatever the world size)."""
        step = int(step)
        ks, idx = self.plan(step)
        B, S = self.batch_size, self.image_size
        pixels = np.empty((B, S, S, 3), dtype=np.uint8) if self.views is None else [None] * B
        labels = torch.full((B,), -1, dtype=torch.long)
        captions: list[str | None] = [None] * B
        counts = {"skipped": 0, "replaced": 0, "retries": 0}
        for b, k in enumerate(ks):
            k = int(k)
            slot = self.rank * B + b
            arr, sample, i = self._fill(step, slot, k, int(idx[b]), counts)
            idx[b] = i
            pixels[b] = arr
            lab = int(sample["label"])
            if lab >= 0 and self._offsets[k] >= 0:
                labels[b] = lab + int(self._offsets[k])
            captions[b] = sample["caption"]
        if self.views is None:
            images, crops, drawn = channels_first(pixels), None, None
        else:
            images, (crops, drawn) = None, self.views(pixels, step)
        return Batch(labels, captions, images, crops, drawn, source=torch.as_tensor(ks, dtype=torch.long),
                     index=torch.as_tensor(idx, dtype=torch.long), step=step, n_skipped=counts["skipped"],
                     n_replaced=counts["replaced"], n_retries=counts["retries"])

    def _fill(self, step: int, slot: int, k: int, i: int, counts: dict) -> tuple[np.ndarray, dict, int]:
        """The image array, sample and index that fill ``slot``: the planned sample ``i``, or,
        if it cannot be read, the next readable index of the slot's own stream."""
        src = self.sources[k]
        g = None
        failures = 0
        while True:
            self._draws[k] += 1
            try:
                arr, sample = self._read(k, i, counts)
                if failures:
                    counts["replaced"] += 1
                return arr, sample, i
            except Exception as e:  # unreadable sample: the slot's next index, same source
                failures += 1
                counts["skipped"] += 1
                self._lost[k] += 1
                what = unreadable_line(src, i, e)
                self._name_unreadable(k, what)
                drawn, lost = int(self._draws[k]), int(self._lost[k])
                if drawn >= MIN_DRAWS and lost / drawn > self.max_lost:
                    raise SourceUnreadableError(
                        f"source {src.name!r}: {lost} of the {drawn} images read are unreadable "
                        f"({lost / drawn:.0%} > data.max_lost={self.max_lost:g}; last: {what}); fix or remove the "
                        f"broken files (`m3i data info {src.name}` lists them), or raise data.max_lost") from None
                if failures >= self.max_failures:
                    raise SourceUnreadableError(
                        f"source {src.name!r} gave {failures} unreadable images in a row (last: {what}); check its "
                        f"files (`m3i data info {src.name}` lists the broken ones)") from e
                g = g or self.slot_rng(step, slot)
                i = int(g.integers(len(src)))

    def _name_unreadable(self, k: int, what: str) -> None:
        """Warn about the first ``NAMED`` unreadable images of source ``k`` (in this process), each
        with what is wrong with it; the rest are counted alone."""
        log.debug("replacing unreadable sample %s", what)
        if self._named[k] < NAMED:
            self._named[k] += 1
            more = f"; further ones of {self.sources[k].name!r} are counted, not named" if self._named[k] == NAMED else ""
            warn_once(f"unreadable image {what}; replaced by another sample of its source (counted in "
                      f"skipped_images){more}")

    def _read(self, k: int, i: int, counts: dict) -> tuple[np.ndarray, dict]:
        """Sample ``i`` of source ``k`` as (uint8 S×S×3 array, sample); a ``ReadFailed`` is tried
        again ``read_retries`` times with backoff."""
        for attempt in range(self.read_retries + 1):
            try:
                return self._load(k, i)
            except ReadFailed:
                if attempt == self.read_retries:
                    raise
                counts["retries"] += 1
                if self.retry_backoff:
                    self.sleep(self.retry_backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _load(self, k: int, i: int) -> tuple[np.ndarray | Image.Image, dict]:
        """The slot's pixels (the S×S array, or with ``views`` the decoded RGB image, JPEGs drafted
        no smaller than the smallest crop needs) and the sample."""
        src, S = self.sources[k], self.image_size if self.views is None else self.views.side
        sample = src.get(i, draft=(S, S)) if self._draft[k] else src.get(i)
        if self.views is not None:
            img = sample["image"]
            return (img if img.mode == "RGB" else img.convert("RGB")), sample
        return image_array(sample["image"], S, self.interpolation), sample

    def steps(self, worker: int = 0, num_workers: int = 1) -> range | Iterator[int]:
        """Steps produced by DataLoader worker ``worker`` of ``num_workers``."""
        first = self.start_step + worker
        if self.num_steps is None:
            return _count(first, num_workers)
        return range(first, self.num_steps, num_workers)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        w, W = (0, 1) if info is None else (info.id, info.num_workers)
        for s in self.steps(w, W):
            yield self.batch(s)

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an unbounded Mixture (num_steps=None) has no length")
        return max(0, self.num_steps - self.start_step)

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.name}: {w:.3g}" for s, w in zip(self.sources, self.weights))
        return (f"Mixture({parts}; batch_size={self.batch_size}, image_size={self.image_size}, "
                f"seed={self.seed}, rank={self.rank}/{self.world_size}, classes={self.num_classes})")


def _check_args(batch_size: int, image_size: int, seed: int, rank: int, world_size: int, interpolation: str) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not 0 <= int(rank) < int(world_size):
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")


def image_array(img: Image.Image, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """What the mixture makes of a decoded image: RGB, resized to ``size``², uint8 (S, S, 3)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), _RESAMPLE[interpolation])
    return np.array(img, dtype=np.uint8)


def channels_first(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> a contiguous uint8 tensor (B, 3, S, S): the batch's images."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def _count(start: int, step: int) -> Iterator[int]:
    s = start
    while True:
        yield s
        s += step
