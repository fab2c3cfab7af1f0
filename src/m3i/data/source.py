"""The source contract shared by every format, and the helpers the formats share.

Every source is a sequence of samples addressed by index. ``get(i)`` returns a dict with

- ``image``: a decoded ``PIL.Image`` in RGB (transparency composited on white),
- ``label``: an ``int`` class index, ``-1`` for none,
- ``caption``: a ``str`` or ``None``.

Sources carry ``name``, ``num_classes`` (0 when the source has no labels or they are hidden)
and ``class_names``. Two switches hide annotations so that a labelled or captioned set can
also serve as plain images: ``labels=False`` and ``captions=False``.

Formats, one module each: :mod:`~m3i.data.folder` (class subfolders or a flat folder),
:mod:`~m3i.data.manifest` (JSONL or CSV listing ``path``, ``caption`` and an optional ``label``),
:mod:`~m3i.data.shards` (WebDataset tar shards in the LAION layout, indexed once for random
access) and the built-in sets :mod:`~m3i.data.fashion_mnist`, :mod:`~m3i.data.emoji` and
:mod:`~m3i.data.digits`. :mod:`~m3i.data.spec` builds any of them from a short spec.

An image that cannot be read or decoded makes ``get`` raise :class:`ImageUnreadable` (a
``ValueError``) naming the file (``locate(i)``) and what is wrong with it: missing, empty, not an
image, truncated, corrupt, or above the decompression-bomb limit (PIL's
``Image.MAX_IMAGE_PIXELS``; ``$M3I_MAX_IMAGE_PIXELS`` sets it); the mixture decides what to do
(skip, count, name the first few). An I/O error that may pass is :class:`ReadFailed` instead.
Entries that are broken before any image is read (a manifest row without a path or with a
non-integer label, the unreadable tail of a damaged shard) are dropped while indexing and
counted in ``num_dropped`` (reasons in ``dropped``). A caption that is empty, longer than
``MAX_CAPTION_CHARS`` or not UTF-8 is dropped (the image is kept without it).
"""

from __future__ import annotations

import re
from typing import Any
from collections.abc import Iterable, Sequence

from PIL import Image

from .images import (MAX_CAPTION_CHARS, ImageUnreadable, ReadFailed,
                     max_image_pixels, unreadable_file)

_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, read with surrogateescape

class Source:
    """Base class of all sources: indexing, annotation switches and the sample dict.

    Subclasses implement ``__len__``, ``_image(i, draft)``, and where they have annotations
    ``_label(i)`` / ``_caption(i)``, ``_all_captions()`` and ``locate(i)``. They set
    ``self._class_names`` (empty when the data has no labels) and ``provides_captions``. A source
    whose images are encoded files sets ``image_files`` (``locate(i)`` is then the file, or
    ``_peek`` reads the ends of the image some other way) for :func:`~m3i.data.check.check_images`.
    """

    provides_captions: bool = False
    image_files: bool = False

    def __init__(self, *, labels: bool = True, captions: bool = True, name: str | None = None):
        self.labels = bool(labels)
        self.captions = bool(captions)
        self.name = name or type(self).__name__
        max_image_pixels()  # a malformed $M3I_MAX_IMAGE_PIXELS stops here, not at every image
        self._class_names: list[str] = []
        self.num_dropped = 0  # entries dropped while indexing
        self.dropped: list[str] = []  # the first reasons, for messages

    # annotations ---------------------------------------------------------------------------
    @property
    def has_labels(self) -> bool:
        return self.labels and len(self._class_names) > 0

    @property
    def has_captions(self) -> bool:
        return self.captions and self.provides_captions

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names) if self.has_labels else []

    @property
    def num_classes(self) -> int:
        return len(self._class_names) if self.has_labels else 0

    # access --------------------------------------------------------------------------------
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for {n} samples")
        return i

    def get(self, i: int, draft: tuple[int, int] | None = None) -> dict[str, Any]:
        """Sample ``i`` as ``dict(image=RGB PIL image, label=int (-1 none), caption=str|None)``."""
        i = self._index(i)
        try:
            image = self._image(i, draft)
        except ImageUnreadable as e:
            raise e.at(self.locate(i)) from e
        except ReadFailed:
            raise  # may pass: the mixture reads it again
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:  # e.g. a shard gone since indexed
            raise unreadable_file(e).at(self.locate(i)) from e
        label = self._label(i) if self.has_labels else -1
        caption = self._caption(i) if self.has_captions else None
        return {"image": image, "label": int(label), "caption": caption}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.get(i)

    def locate(self, i: int) -> str:
        """Where sample ``i`` lives (a path), for messages."""
        return f"{self.name}[{i}]"

    def all_captions(self) -> list[str]:
        """Every non-empty caption of the source in index order (empty when captions are off)."""
        if not self.has_captions:
            return []
        return [c for c in self._all_captions() if c]

    def summary(self, check: bool = True, decode: bool = False) -> dict[str, Any]:
        """What the source holds: ``samples``, ``labelled`` and ``captioned`` (counts of samples
        with a label / a caption, 0 when hidden), ``classes``, ``dropped`` (entries dropped while
        indexing, with the first reasons), ``images`` (with ``check``, every image checked by
        :func:`~m3i.data.check.check_images`; ``decode``: each decoded in full), ``broken``
        ({what: count}) and ``problems`` (lines naming what is broken). Formats add their own fields."""
        from .check import check_images, problem_lines

        labelled = sum(self._label(i) >= 0 for i in range(len(self))) if self.has_labels else 0
        captioned = sum(1 for c in self._all_captions() if c) if self.has_captions else 0
        images = check_images(self, decode) if check else None
        return {"name": self.name, "samples": len(self), "labelled": int(labelled), "captioned": int(captioned),
                "classes": self.num_classes, "dropped": self.num_dropped, "dropped_reasons": list(self.dropped),
                "images": images, "broken": {"unreadable images": images["broken"]} if images else {},
                "problems": [f"dropped: {r}" for r in self.dropped] + (problem_lines(images) if images else [])}

    def _peek(self, i: int, head: int, tail: int) -> tuple[bytes, bytes, int]:
        """The first ``head`` and last ``tail`` bytes of sample ``i``'s image file and its size."""
        from .check import peek_file

        return peek_file(self.locate(i), head, tail)

    def _group(self, i: int) -> str:
        """What holds sample ``i`` (a shard), for the report of broken images."""
        return self.name

    def _image(self, i: int, draft: tuple[int, int] | None) -> Image.Image:  # pragma: no cover
        raise NotImplementedError

    def _label(self, i: int) -> int:
        return -1

    def _caption(self, i: int) -> str | None:
        return None

    def _all_captions(self) -> Iterable[str | None]:
        return (self._caption(i) for i in range(len(self)))

    def _require_samples(self, n: int, what: str) -> None:
        if n == 0:
            first = f" (first dropped: {self.dropped[0]})" if self.dropped else ""
            raise ValueError(f"source {self.name!r} has no usable sample: {what}{first}")

    def _drop(self, reason: str, n: int = 1) -> None:
        self.num_dropped += n
        if len(self.dropped) < 5:
            self.dropped.append(reason)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, len={len(self)}, "
            f"num_classes={self.num_classes}, captions={self.has_captions})"
        )


def clean_caption(text: Any) -> tuple[str | None, str | None]:
    """(caption or None, why it was dropped or None): empty, huge or not UTF-8 (text read with
    ``surrogateescape`` or ``bytes``) captions are dropped."""
    if text is None:
        return None, None
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None, "not UTF-8"
    text = str(text).strip()
    if not text:
        return None, "empty"
    if not text.isascii() and _ESCAPED.search(text):
        return None, "not UTF-8"
    if len(text) > MAX_CAPTION_CHARS:
        return None, f"longer than {MAX_CAPTION_CHARS} characters"
    return text, None


def label_space(cells: Sequence[Any]) -> tuple[list[int | None], list[str]]:
    """Label cells of a manifest or shards -> (the label of each cell, ``None`` where invalid; the
    class names). The first label decides what all are: an integer, and they are the ids
    themselves (classes ``"0"`` … ``"max"``; a name among them is invalid); a class name, and every
    label is a name, the ids following the sorted names. ``-1``, empty and null mean no label."""
    parsed = [parse_label(c) for c in cells]
    first = next((c for c, p in zip(cells, parsed) if p != -1), None)
    if first is None or parse_label(first) is not None or not isinstance(first, str):
        return parsed, [str(c) for c in range(max([p for p in parsed if p is not None] + [-1]) + 1)]
    names = [None if p == -1 else str(c).strip() if isinstance(c, (str, int)) and not isinstance(c, bool) else False
             for c, p in zip(cells, parsed)]
    classes = sorted({n for n in names if n})
    ids = {n: i for i, n in enumerate(classes)}
    return [-1 if n is None else None if n is False else ids[n] for n in names], classes


def parse_label(raw: Any) -> int | None:
    """Parse a label cell: int >= 0, or -1 / empty / null for none. ``None`` means invalid."""
    if raw is None:
        return -1
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw if raw >= -1 else None
    if isinstance(raw, float):
        return int(raw) if raw.is_integer() and raw >= -1 else None
    text = str(raw).strip()
    if text == "":
        return -1
    if re.fullmatch(r"-?\d+", text):
        v = int(text)
        return v if v >= -1 else None
    return None
