"""The images a source counts, checked before a run meets them (``m3i data info``).

Decoding every image of a set of millions takes hours, so each image is first looked at cheaply:
its first and last bytes (one small read each, from the file or the shard). An image whose start
is no known format, a JPEG that does not end with its end marker, a PNG that does not end with
its ``IEND`` chunk or claims more pixels than the decompression-bomb limit, a WebP or BMP shorter
than its header says: each of these is decoded in full, and counted as broken if that fails (a
JPEG with bytes after its end marker decodes, and is not counted). A seeded sample of
``SAMPLE`` images is decoded in full as well, for damage inside a file whose ends look right;
``decode=True`` decodes every image.
"""
from __future__ import annotations

import os
import struct
import sys
from collections import Counter
from typing import Any

import numpy as np

from .images import ImageUnreadable, ReadFailed, image_format, max_image_pixels, unreadable_file

HEAD, TAIL = 32, 16  # bytes read from each end of an image
SAMPLE = 256  # images decoded in full, seeded, besides the suspect ones
NAMED = 3  # broken images named per shard (or source)
GROUPS = 5  # shards named in the text report


def peek_file(path: str, head: int = HEAD, tail: int = TAIL) -> tuple[bytes, bytes, int]:
    """The first ``head`` and last ``tail`` bytes of a file and its size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(head)
            if size > head:
                f.seek(max(head, size - tail))
            return first, f.read(tail) if size > head else first[-tail:], size
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise unreadable_file(e).at(path) from e


def suspect(head: bytes, tail: bytes, size: int) -> bool:
    """Whether the ends of an image file look wrong (see the module docstring)."""
    fmt = image_format(head)
    if fmt is None or size < len(head) or size < 24:
        return True
    if fmt == "JPEG":
        return not tail.endswith(b"\xff\xd9")
    if fmt == "PNG":
        width, height = struct.unpack(">II", head[16:24])
        limit = max_image_pixels()
        return not tail.endswith(b"IEND\xaeB`\x82") or bool(limit and width * height > limit)
    if fmt == "WebP":
        return int.from_bytes(head[4:8], "little") + 8 > size
    if fmt == "BMP":
        return int.from_bytes(head[2:6], "little") > size
    return False


def check_images(src, decode: bool = False, sample: int = SAMPLE, progress: bool | None = None) -> dict | None:
    """Every image of ``src`` checked (see the module docstring): ``checked`` (images looked at),
    ``decoded`` (in full), ``broken`` (that cannot be read), ``kinds`` ({kind: count}, the kinds of
    :class:`~m3i.data.images.ImageUnreadable`), and ``where``: per shard (or the source) holding
    broken images, ``{"where", "broken", "images", "first"}`` with the first ``NAMED`` named. None
    for a source whose images are held in memory, not in files."""
    from tqdm import tqdm

    n = len(src)
    if not src.image_files:
        return None
    full = np.ones(n, bool) if decode else np.zeros(n, bool)
    full[np.random.default_rng(0).choice(n, min(sample, n), replace=False)] = True
    totals, bad, kinds, first = Counter(), Counter(), Counter(), {}
    decoded = 0
    progress = sys.stderr.isatty() if progress is None else progress
    for i in tqdm(range(n), desc=f"check {src.name}", unit="img", disable=not progress, file=sys.stderr):
        group = src._group(i)
        totals[group] += 1
        try:
            if not full[i] and not suspect(*src._peek(i, HEAD, TAIL)):
                continue
            decoded += 1
            src.get(i)
        except (ImageUnreadable, ReadFailed) as e:
            why = e if isinstance(e, ImageUnreadable) else ImageUnreadable("read error", str(e))
            bad[group] += 1
            kinds[why.kind] += 1
            where = why.where or src.locate(i)
            name = where[len(group) + 1:] if where.startswith(group + ":") else where  # a shard's member: KEY.EXT
            if len(first.setdefault(group, [])) < NAMED:
                first[group].append(f"{name}: {why.why}")
    return {"checked": n, "decoded": decoded, "broken": sum(bad.values()), "kinds": dict(kinds),
            "where": [{"where": g, "broken": bad[g], "images": totals[g], "first": first[g]} for g in bad]}


def problem_lines(result: dict[str, Any], groups: int = GROUPS) -> list[str]:
    """The text report of :func:`check_images`: one line per shard (or source) with broken images."""
    where = result["where"]
    lines = [f"{w['where']}: {w['broken']:,} of {w['images']:,} images unreadable (first: {'; '.join(w['first'])})"
             for w in where[:groups]]
    if len(where) > groups:
        lines.append(f"... and {len(where) - groups:,} more shards with unreadable images (--json lists them all)")
    return lines
