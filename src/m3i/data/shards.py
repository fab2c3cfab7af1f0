"""WebDataset tar shards in the LAION layout, indexed once for random access (spec
``shards:PATTERN``)."""

from __future__ import annotations

import glob
import os
import re
import tarfile
from typing import Any
from collections.abc import Sequence

import numpy as np

from .source import Source, clean_caption, decode_image, label_space, parse_label, warn_once
from .spec import Spec, register_source

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order inside one sample

# In-memory index per shard file, keyed by (real path, size, mtime): built once per process
# (inherited by forked DataLoader workers) and shared by every Shards object reading the file.
_SHARD_INDEX: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
_TRUNCATED: set[tuple[str, int, int]] = set()


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


def index_shard(path: str) -> list[dict[str, Any]]:
    """Samples of one uncompressed tar shard: key, image member (offset, size), caption member
    (offset, size) and label. Small ``.cls`` members are read while scanning; images and captions
    are read later by offset. Cached in memory."""
    from webdataset.tariterators import base_plus_ext

    st = os.stat(path)
    cache_key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    hit = _SHARD_INDEX.get(cache_key)
    if hit is not None:
        return hit
    samples: dict[str, dict[str, Any]] = {}
    try:
        tf = tarfile.open(path, mode="r:")
    except tarfile.ReadError as e:
        raise ValueError(
            f"shard {path!r} is not an uncompressed tar file ({e}); random access needs plain .tar shards"
        ) from None
    truncated = False
    with tf:
        members = []
        try:
            for m in tf:
                members.append(m)
        except (tarfile.ReadError, EOFError, OSError):  # a truncated shard: keep what is whole
            truncated = True
        with open(path, "rb") as f:  # after the last header: end-of-archive zeros, or a cut-off header
            f.seek(tf.offset)
            truncated = truncated or bool(f.read(1 << 16).strip(b"\0"))
        for m in members:
            if not m.isfile():
                continue
            if m.offset_data + m.size > st.st_size:  # its data is cut off
                truncated = True
                continue
            key, ext = base_plus_ext(m.name)
            if key is None:
                continue
            ext = ext.lower()
            s = samples.setdefault(key, {"key": key})
            if ext in SHARD_IMAGE_EXTENSIONS:
                s.setdefault("images", {})[ext] = (m.offset_data, m.size)
            elif ext == "txt":
                s["txt"] = (m.offset_data, m.size)
            elif ext == "cls":
                f = tf.extractfile(m)
                s["cls_raw"] = f.read().decode("utf-8", "replace").strip() if f else ""
    index = []
    for s in samples.values():
        imgs = s.pop("images", None)
        if not imgs:
            continue
        ext = next(e for e in SHARD_IMAGE_EXTENSIONS if e in imgs)
        s["image"] = imgs[ext]
        s["ext"] = ext
        s["label"] = s.pop("cls_raw", None)  # an id or a class name; the Shards object maps it
        index.append(s)
    _SHARD_INDEX[cache_key] = index
    if truncated:
        _TRUNCATED.add(cache_key)
    return index


def shard_truncated(path: str) -> bool:
    """Whether :func:`index_shard` found ``path`` cut off (its whole samples are still indexed)."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns) in _TRUNCATED


def _pread(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: short read at offset {offset} ({len(data)} of {size} bytes)")
    return data


class Shards(Source):
    """WebDataset tar shards in the LAION layout: ``KEY.jpg|png|jpeg|webp`` + ``KEY.txt``
    (+ optional ``KEY.cls`` holding a label: integer ids, or class names when the first label is
    one: ids follow the sorted names, kept as ``class_names``).

    ``urls``: a path, a brace pattern (``/data/{000000..000099}.tar``), a glob, or a list of
    those. Random access: each shard's tar headers are scanned once into an in-memory index of
    member offsets; ``get(i)`` then reads the image (and caption) by offset. Keys without an
    image are ignored. :meth:`stream` reads the same shards sequentially through
    ``webdataset.WebDataset``.
    """

    provides_captions = True

    def __init__(self, urls: str | Sequence[str], labels: bool = True, captions: bool = True,
                 name: str | None = None):
        super().__init__(labels=labels, captions=captions,
                         name=name or f"shards:{urls if isinstance(urls, str) else len(urls)}")
        self.urls = expand_shards(urls)
        self._require_samples(len(self.urls), "the shard list is empty")
        shard_of: list[np.ndarray] = []
        self._shard_index: list[list[dict[str, Any]]] = []
        for k, u in enumerate(self.urls):
            idx = index_shard(u)
            if shard_truncated(u):  # how many samples the cut took is unknown: counted as one
                self._drop(f"{u}: truncated; its samples up to the cut are used")
                warn_once(f"shard {u!r} is truncated; its {len(idx)} whole samples are used, the rest is lost")
            self._shard_index.append(idx)
            shard_of.append(np.full(len(idx), k, dtype=np.int32))
        # .cls cells: integer ids, or class names (ids follow the sorted names)
        cells = [s["label"] for idx in self._shard_index for s in idx]
        self.provides_captions = any("txt" in s for idx in self._shard_index for s in idx)
        labels, self._class_names = label_space(cells)
        if None in labels:
            i = labels.index(None)
            k = int(np.searchsorted(np.cumsum([len(ix) for ix in self._shard_index]), i, side="right"))
            raise ValueError(f"shard {self.urls[k]!r}: a .cls member holds {cells[i]!r}, but the first label of the "
                             f"shards is an integer id; give every sample an id, or every sample a class name")
        self._labels = np.asarray(labels, dtype=np.int64)
        self._label_ids = None if all(c.isdigit() for c in self._class_names) else \
            {n: i for i, n in enumerate(self._class_names)}
        self._shard = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        counts = np.array([len(ix) for ix in self._shard_index], dtype=np.int64)
        self._start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._require_samples(len(self._shard), f"no KEY.jpg|png|jpeg|webp members in {len(self.urls)} shard(s)")
        self._key_pos: dict[str, int] | None = None

    def __len__(self):
        return len(self._shard)

    def _entry(self, i: int) -> tuple[str, dict[str, Any]]:
        k = int(self._shard[i])
        return self.urls[k], self._shard_index[k][i - int(self._start[k])]

    def key(self, i: int) -> str:
        """The sample key (member name without extension) of index ``i``."""
        return self._entry(self._index(i))[1]["key"]

    def find(self, key: str) -> int:
        """Index of the sample with ``key`` (KeyError if absent)."""
        if self._key_pos is None:
            self._key_pos = {}
            for i in range(len(self)):
                self._key_pos.setdefault(self._entry(i)[1]["key"], i)
        return self._key_pos[key]

    def _image(self, i, draft):
        path, s = self._entry(i)
        return decode_image(_pread(path, *s["image"]), draft)

    def _label(self, i):
        return int(self._labels[i])

    def _caption(self, i):
        path, s = self._entry(i)
        if "txt" not in s:
            return None
        return clean_caption(_pread(path, *s["txt"]))[0]

    def locate(self, i):
        path, s = self._entry(i)
        return f"{path}:{s['key']}.{s['ext']}"

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
