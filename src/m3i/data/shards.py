"""WebDataset tar shards in the LAION layout, read at random through the set's index (spec
``shards:PATTERN``)."""

from __future__ import annotations

import bisect
import glob
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .index import IMAGE_EXTENSIONS, damage, open_index
from .images import ReadFailed, decode_image, warn_once
from .source import Source, clean_caption, label_space, parse_label
from .spec import Spec, register_source

SHARD_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS  # preference order inside one sample


def expand_shards(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand brace patterns (``shard-{000..009}.tar``), globs and lists into local shard paths."""
    from webdataset.shardlists import expand_urls

    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in items:
        for u in expand_urls(str(item)):
            u = u[len("file:"):] if u.startswith("file:") else u
            if re.match(r"^[a-z][a-z0-9+.-]*:", u) and not os.path.exists(u):
                raise ValueError(
                    f"shard {u!r} is not a local file: random access needs local .tar files "
                    "(use Shards(...).stream() for remote or piped shards)"
                )
            u = os.path.expanduser(u)
            if glob.has_magic(u):
                found = sorted(glob.glob(u))
                if not found:
                    raise FileNotFoundError(
                        f"no shard matches {u!r}: expected WebDataset .tar shards (KEY.jpg + KEY.txt)"
                    )
                out.extend(found)
            else:
                out.append(u)
    for u in out:
        if not os.path.isfile(u):
            raise FileNotFoundError(
                f"shard {u!r} not found: expected a WebDataset .tar shard holding KEY.jpg|png|jpeg|webp "
                "+ KEY.txt (+ optional KEY.cls)"
            )
    return out


class Shards(Source):
    """WebDataset tar shards in the LAION layout: ``KEY.jpg|png|jpeg|webp`` + ``KEY.txt``
    (+ optional ``KEY.cls`` holding a label: integer ids, or class names when the first label is
    one: ids follow the sorted names, kept as ``class_names``).

    ``urls``: a path, a brace pattern (``/data/{000000..000099}.tar``), a glob, or a list of
    those. Random access through the set's index (:mod:`m3i.data.index`): built once, in
    parallel, and memory-mapped, so every process shares one copy; ``get(i)`` then reads the
    image (and caption) by offset from a file kept open. Keys without an image are ignored
    (counted by :meth:`summary`). :meth:`stream` reads the same shards sequentially through
    ``webdataset.WebDataset``.

    ``index_processes``: processes that scan the shards when the index is built (default: one
    per CPU); ``progress``: a progress bar while it is built.
    """

    provides_captions = True
    image_files = True
    MAX_OPEN = 128  # shard files kept open per process

    def __init__(self, urls: str | Sequence[str], labels: bool = True, captions: bool = True,
                 name: str | None = None, *, index_processes: int | None = None, progress: bool = True):
        super().__init__(labels=labels, captions=captions,
                         name=name or f"shards:{urls if isinstance(urls, str) else len(urls)}")
        self.urls = expand_shards(urls)
        self._require_samples(len(self.urls), "the shard list is empty")
        self.index = open_index(self.urls, processes=index_processes, progress=progress)
        try:
            self.index.check()  # a set without a sample: one line naming its damaged shards
        except ValueError as e:
            raise ValueError(f"source {self.name!r}: {e}") from None
        self._drop_damaged()
        self.provides_captions = bool(np.count_nonzero(np.asarray(self.index.text_size)))
        self._label_of = self._label_table()  # code of a raw .cls value -> label; the last entry: none
        self._key_pos: dict[str, int] | None = None
        self._fds: OrderedDict[int, int] = OrderedDict()

    def _drop_damaged(self) -> None:
        """Count what the damaged shards lost among the dropped entries, each shard named, and warn
        once. What a shard lost is unknown: it is taken as an intact shard's mean count less the
        samples it kept (at least 1), so that ``data.max_lost`` weighs a set of mostly broken shards."""
        shards, bad = self.index.shards, self.index.damaged()
        if not bad:
            return
        whole = [s["samples"] for s in shards if not damage(s)]
        mean = round(sum(whole) / len(whole)) if whole else 0
        for s in bad:
            lost = max(1, mean - s["samples"])
            est = f"about {lost:,} lost (an intact shard holds {mean:,})" if whole else "the rest lost"
            self._drop(f"{s['path']}: {damage(s)}; {s['samples']:,} whole samples used, {est}", lost)
        warn_once(f"{len(bad):,} of {len(shards):,} shards are damaged (first: {self.dropped[0]}); "
                  f"`m3i data info` lists them")

    def _label_table(self) -> np.ndarray:
        """Code of each raw ``.cls`` value (the index's table) -> label id, the last entry meaning none:
        integer ids, or class names when the first label is a name (ids follow the sorted names)."""
        labels, self._class_names = label_space(self.index.labels)
        if None in labels:
            code = labels.index(None)
            i = int(np.flatnonzero(np.asarray(self.index.label) == code)[0])
            raise ValueError(f"shard {self._where(i)[0]!r}: {self.index.key(i)}.cls holds {self.index.labels[code]!r}, but "
                             f"the first label of the shards is an integer id; give every sample an id, or every "
                             f"sample a class name")
        self._label_ids = None if all(c.isdigit() for c in self._class_names) else \
            {n: i for i, n in enumerate(self._class_names)}
        return np.asarray(labels + [-1], dtype=np.int64)

    def __len__(self):
        return len(self.index)

    def __getstate__(self):  # open files stay with their process
        return {**self.__dict__, "_fds": OrderedDict()}

    def _where(self, i: int) -> tuple[str, int]:
        k = bisect.bisect_right(self.index.starts, i) - 1
        return self.index.shards[k]["path"], k

    def _read(self, i: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of sample ``i``'s shard; an I/O error is :class:`ReadFailed`."""
        path, k = self._where(i)
        try:
            fd = self._fds.get(k)
            if fd is None:
                if len(self._fds) >= self.MAX_OPEN:
                    os.close(self._fds.popitem(last=False)[1])
                fd = self._fds[k] = os.open(path, os.O_RDONLY)
            else:
                self._fds.move_to_end(k)
            data = os.pread(fd, size, offset)
        except FileNotFoundError:
            raise
        except OSError as e:
            self._close(k)
            raise ReadFailed(f"{path}: reading {size} bytes at offset {offset} failed: {e}") from e
        if len(data) != size:
            self._close(k)
            raise ReadFailed(f"{path}: short read at offset {offset} ({len(data)} of {size} bytes)")
        return data

    def _close(self, k: int) -> None:
        fd = self._fds.pop(k, None)
        if fd is not None:
            os.close(fd)

    def key(self, i: int) -> str:
        """The sample key (member name without extension) of index ``i``."""
        return self.index.key(self._index(i))

    def find(self, key: str) -> int:
        """Index of the sample with ``key`` (KeyError if absent)."""
        if self._key_pos is None:
            self._key_pos = {}
            for i in range(len(self)):
                self._key_pos.setdefault(self.index.key(i), i)
        return self._key_pos[key]

    def _image(self, i, draft):
        ix = self.index
        return decode_image(self._read(i, int(ix.image_offset[i]), int(ix.image_size[i])), draft)

    def _label(self, i):
        return int(self._label_of[self.index.label[i]])

    def _caption(self, i):
        n = int(self.index.text_size[i])
        if not n:
            return None
        return clean_caption(self._read(i, int(self.index.text_offset[i]), n))[0]

    def locate(self, i):
        return f"{self._where(i)[0]}:{self.index.key(i)}.{IMAGE_EXTENSIONS[int(self.index.ext[i])]}"

    def _peek(self, i: int, head: int, tail: int) -> tuple[bytes, bytes, int]:
        at, n = int(self.index.image_offset[i]), int(self.index.image_size[i])
        return self._read(i, at, min(head, n)), self._read(i, at + max(0, n - tail), min(tail, n)), n

    def _group(self, i: int) -> str:
        return self._where(i)[0]

    def summary(self, check: bool = True, decode: bool = False) -> dict[str, Any]:
        ix = self.index
        out = super().summary(check, decode)
        bad = ix.damaged()
        out.update(
            labelled=int(np.count_nonzero(self._label_of[np.asarray(ix.label)] >= 0)) if self.has_labels else 0,
            captioned=int(np.count_nonzero(np.asarray(ix.text_size))) if self.has_captions else 0,
            shards=len(ix.shards),
            members=sum(s["members"] for s in ix.shards),
            broken={"keys without an image": sum(s["no_image"] for s in ix.shards),
                    "members cut off": sum(s["cut"] for s in ix.shards),
                    "damaged shards": len(bad), **out["broken"]},
            damaged=[{"path": s["path"], "damage": damage(s), "samples": s["samples"]} for s in bad],
            index={"path": str(ix.path), "bytes": ix.nbytes, "created": ix.created},
        )
        out["problems"] = ix.check() + [p for p in out["problems"] if not p.startswith("dropped: ")]
        return out

    def stream(self, shuffle_shards: bool = False, seed: int = 0):
        """Sequential reading through ``webdataset.WebDataset`` (split across ranks and
        DataLoader workers by shard). Yields ``dict(image, label, caption, key)`` with the same
        annotation switches as :meth:`get`; undecodable samples are skipped with a warning."""
        import webdataset as wds

        ds = wds.WebDataset(
            self.urls,
            shardshuffle=len(self.urls) if shuffle_shards else False,
            detshuffle=True,
            seed=seed,
            nodesplitter=wds.split_by_node,
            empty_check=False,
        )
        return ds.map(self._from_stream, handler=wds.warn_and_continue)

    def _from_stream(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        ext = next((e for e in SHARD_IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            return None
        label, caption = -1, None
        if self.has_labels and "cls" in sample:
            raw = sample["cls"].decode("utf-8", "replace").strip()
            parsed = self._label_ids.get(raw, -1) if self._label_ids is not None else parse_label(raw)
            label = -1 if parsed is None else parsed
        if self.has_captions and "txt" in sample:
            caption = sample["txt"].decode("utf-8", "replace").strip() or None
        return {"image": decode_image(sample[ext]), "label": int(label), "caption": caption,
                "key": sample["__key__"]}


@register_source("shards", "shards:PATTERN")
def _build(spec: Spec) -> Shards:
    return Shards(spec.path(), **spec.common)
