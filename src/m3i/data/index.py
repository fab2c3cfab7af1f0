"""The index of a shard set: where every sample's image, caption and label lie, in a few
memory-mapped arrays shared by every process that reads the set.

A WebDataset shard is a plain tar file; a sample is the members that share a key
(``KEY.jpg`` + ``KEY.txt`` + ``KEY.cls``). :func:`scan_shard` reads the tar headers of one
shard (nothing but the headers and the small ``.cls`` members); :func:`open_index` scans every
shard of a set once, in parallel processes, and writes one index file:

- per sample (``N`` rows): ``image_offset`` int64, ``image_size`` uint32, ``text_offset``
  int64, ``text_size`` uint32 (0: no caption), ``label`` int32 (a code into the index's table
  of raw ``.cls`` values, -1 for none), ``ext`` uint8 (the image format): 29 bytes; then
  ``key_end`` (uint32, uint64 past 4 GiB of keys) and the keys themselves, 4 + 9 bytes for
  LAION's ``000012345``: 42 bytes in all;
- per shard (a JSON header): its path, size and mtime when it was scanned, its first sample,
  what it held that is no sample (members of keys without an image, a truncated tail), and
  what is wrong with it when it is damaged (empty, no tar, compressed, cut, garbled), in words.

The file is memory-mapped read-only, so every DataLoader worker and every rank on a machine
reads the one copy in the page cache. When it is opened, each shard's size and mtime are
compared with the index's: a changed shard is scanned again (the others are kept) and the
file replaced, with a message. Building takes a file lock, so ranks that start together wait
for the one that builds.

The file lies beside the shards (``DIR/.m3i-index-HASH.bin``, HASH from the list of shard
paths), or under ``$M3I_INDEX_DIR`` (default ``~/.cache/m3i/index``) when the shards' folder is
not writable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "m3i-shard-index/1"
MAGIC = b"M3I-SHARD-INDEX\n"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order inside one sample
_ALIGN = 64
_BLOCK = 512
_FIELDS = {  # the per-sample arrays and their types (key_end is uint32 when the keys fit)
    "image_offset": np.int64, "image_size": np.uint32, "text_offset": np.int64, "text_size": np.uint32,
    "label": np.int32, "ext": np.uint8,
}


def index_dir() -> Path:
    """Where indexes go when the shards' folder is not writable: ``$M3I_INDEX_DIR``, else
    ``~/.cache/m3i/index``."""
    env = os.environ.get("M3I_INDEX_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "m3i" / "index"


# -- one shard -------------------------------------------------------------------------------
def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes of 8 GiB and more
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else n
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(h: bytes) -> bool:
    stored = _octal(h[148:156])
    total = sum(h) - sum(h[148:156]) + 8 * 32
    return stored == total


def split_key(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a member name by webdataset's rule (``base_plus_ext``: the key runs
    to the first dot of the base name); its regular expression only for the rare names whose
    base name has no dot or starts with one."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot > slash:
        return name[:dot], name[dot + 1:]
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header (``LEN path=VALUE\\n`` records)."""
    pos, path = 0, None
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(data[pos:sp])
        except ValueError:
            break
        record = data[sp + 1:pos + length - 1]
        k, _, v = record.partition(b"=")
        if k == b"path":
            path = v.decode("utf-8", "surrogateescape")
        pos += length
        if length <= 0:
            break
    return path


@dataclass
class ShardScan:
    """What :func:`scan_shard` found in one shard: the per-sample arrays, the raw ``.cls``
    values, and what is no sample."""

    arrays: dict[str, np.ndarray]
    keys: bytes
    key_len: np.ndarray  # per sample
    labels: list[str]  # raw .cls values, the codes in arrays["label"] index this list
    members: int  # regular file members
    no_image: int  # keys that have no image member (their members are unused)
    cut: int  # members whose data the end of the file cuts off
    truncated: bool  # the shard is damaged: it ends early, is garbled or is no tar at all
    damage: str | None = None  # what is wrong with it, in words (None: whole)


COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
               (b"\x04\x22\x4d\x18", "lz4"))


def _header_size(h: bytes) -> int | None:
    """The member size a tar header gives, or None when ``h`` is no whole, valid header."""
    if len(h) < _BLOCK:
        return None
    try:
        return _octal(h[124:136]) if _checksum_ok(h) else None
    except ValueError:  # fields that are no octal numbers: garbage, not a header
        return None


def _not_tar(head: bytes, size: int) -> str:
    """Why a file with no tar header at its start is no shard."""
    if size == 0:
        return "empty file (0 bytes)"
    kind = next((k for magic, k in COMPRESSED if head.startswith(magic)), None)
    if kind:
        return f"{kind}-compressed, not a plain tar; random access needs uncompressed .tar shards (decompress it)"
    return "not a tar file (no tar header at its start); random access needs uncompressed .tar shards"


class _Walk:
    """The regular members ``(name, data offset, size)`` of the tar mapped in ``mm``, header by
    header. ``members`` counts them; where the walk stops before the end-of-archive blocks,
    ``damage`` says why, and ``cut`` counts a member whose data the end of the file cuts off."""

    def __init__(self, mm, size: int):
        self.mm, self.size = mm, size
        self.members = self.cut = 0
        self.damage: str | None = None
        self.last: str | None = None  # the last whole member, for messages

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        mm, size, pos, long_name = self.mm, self.size, 0, None
        while True:
            h = mm[pos:pos + _BLOCK]
            if len(h) == _BLOCK and h.count(0) == _BLOCK:
                return  # end of archive
            n = _header_size(h)
            if n is None:
                self.damage = self._no_header(pos, h)
                return
            flag, data_at = h[156:157], pos + _BLOCK
            if flag in (b"x", b"L"):  # the next member's name: pax header or GNU long name
                if data_at + n > size:
                    self.damage = f"truncated: the file ends inside a long-name header at byte {pos:,}"
                    return
                raw = mm[data_at:data_at + n]
                long_name = _pax_path(raw) if flag == b"x" else raw.split(b"\0", 1)[0].decode(
                    "utf-8", "surrogateescape")
            elif flag in (b"0", b"\0", b"7"):
                name = long_name if long_name is not None else _header_name(h)
                long_name = None
                self.members += 1
                if data_at + n > size:
                    self.cut += 1
                    self.damage = f"truncated: the file ends inside {name} ({size - data_at:,} of its {n:,} bytes)"
                    return
                yield name, data_at, n
                self.last = name
            else:  # directories, links, global headers
                long_name = None
            pos = data_at + (n + _BLOCK - 1) // _BLOCK * _BLOCK

    def _no_header(self, pos: int, h: bytes) -> str:
        if pos == 0:
            return _not_tar(bytes(h[:8]), self.size)
        after = f" after {self.last}" if self.last else ""
        if pos >= self.size:
            return f"truncated: the file ends{after} without tar's end-of-archive blocks"
        if len(h) < _BLOCK:
            return f"truncated: the file ends inside a tar header at byte {pos:,}{after}"
        return f"corrupt: no valid tar header at byte {pos:,}{after}; the rest of the file is lost"


def _header_name(h: bytes) -> str:
    name = h[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if h[257:263] == b"ustar\0" and h[345:346] != b"\0":  # POSIX prefix
        name = h[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
    return name


def scan_shard(path: str) -> ShardScan:
    """Read the tar headers of one uncompressed shard (ustar, pax and GNU long names) and
    group its members by key with webdataset's rule (the key is the name up to the first dot of
    its base name). A damaged shard (empty, no tar, cut, garbled) gives what it holds before the
    damage, and ``damage`` says what is wrong; a file that cannot be opened raises ``ValueError``."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ValueError(f"shard {path!r} cannot be read: {e.strerror or e}") from e
    samples: dict[str, dict[str, Any]] = {}
    with f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            walk = _Walk(mm, size)
            for name, at, n in walk:
                key, ext = split_key(name)
                if key is None:
                    continue
                ext = ext.lower()
                s = samples.setdefault(key, {})
                if ext in IMAGE_EXTENSIONS:
                    s.setdefault("images", {})[ext] = (at, n)
                elif ext == "txt":
                    s["txt"] = (at, n)
                elif ext == "cls":
                    s["cls"] = bytes(mm[at:at + n]).decode("utf-8", "replace").strip()
        finally:
            if size:
                mm.close()
    return _scan_of(samples, walk)


def _scan_of(samples: dict[str, dict[str, Any]], walk: _Walk) -> ShardScan:
    """The per-sample arrays of one shard's samples (keys with an image, in member order)."""
    rows = [(k, s) for k, s in samples.items() if s.get("images")]
    m = len(rows)
    arrays = {name: np.zeros(m, dtype) for name, dtype in _FIELDS.items()}
    arrays["label"][:] = -1
    codes: dict[str, int] = {}
    keys = []
    for r, (key, s) in enumerate(rows):
        imgs = s["images"]
        e = next(i for i, x in enumerate(IMAGE_EXTENSIONS) if x in imgs)
        arrays["image_offset"][r], arrays["image_size"][r] = imgs[IMAGE_EXTENSIONS[e]]
        arrays["ext"][r] = e
        if "txt" in s:
            arrays["text_offset"][r], arrays["text_size"][r] = s["txt"]
        if "cls" in s:
            arrays["label"][r] = codes.setdefault(s["cls"], len(codes))
        keys.append(key.encode("utf-8", "surrogateescape"))
    return ShardScan(arrays, b"".join(keys), np.fromiter(map(len, keys), np.int64, m), list(codes), walk.members,
                     len(samples) - m, walk.cut, walk.damage is not None, walk.damage)


# -- the set ---------------------------------------------------------------------------------
def set_hash(paths: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(os.path.abspath(p) for p in paths).encode()).hexdigest()[:16]


def index_paths(paths: Sequence[str]) -> list[Path]:
    """Where the index of ``paths`` may lie, in the order they are tried: beside the shards
    (their common folder), then the cache folder."""
    name = f".m3i-index-{set_hash(paths)}.bin"
    common = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]))
    return [common / name, index_dir() / name[1:]]


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class ShardIndex:
    """An index file, memory-mapped: ``len`` samples over ``shards`` (a list of dicts with
    ``path``, ``size``, ``mtime_ns``, ``start``, ``samples``, ``members``, ``no_image``, ``cut``,
    ``truncated``, ``damage``), the raw ``.cls`` values ``labels``, and the per-sample arrays as attributes
    (``image_offset``, ``image_size``, ``text_offset``, ``text_size``, ``label``, ``ext``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError(f"{self.path}: not an m3i shard index")
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        if header.get("format") != FORMAT:
            raise ValueError(f"{self.path}: index format {header.get('format')!r}, expected {FORMAT!r}")
        self.header = header
        self.shards: list[dict[str, Any]] = header["shards"]
        self.labels: list[str] = header["labels"]
        self.created: float = header["created"]
        self.starts = [s["start"] for s in self.shards]  # a list: bisect on it costs nothing
        self.maps: dict[str, np.ndarray] = {}  # np.memmap of each array (zeros when empty)
        for name, a in header["arrays"].items():
            count = int(np.prod(a["shape"]))
            self.maps[name] = (np.memmap(self.path, dtype=a["dtype"], mode="r", offset=a["offset"], shape=tuple(a["shape"]))
                               if count else np.zeros(a["shape"], a["dtype"]))
            # a plain view of the same pages: indexing it skips np.memmap's Python-level __getitem__
            setattr(self, name, self.maps[name].view(np.ndarray))

    def __len__(self) -> int:
        return len(self.image_offset)

    def __reduce__(self):  # a process started by spawn maps the file again rather than copying it
        return (ShardIndex, (str(self.path),))

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    def key(self, i: int) -> str:
        end = int(self.key_end[i])
        start = int(self.key_end[i - 1]) if i else 0
        return bytes(self.keys[start:end]).decode("utf-8", "surrogateescape")

    def stale(self) -> list[int]:
        """Shards whose size or mtime differ from when they were scanned (or that are gone), and
        damaged ones an earlier index did not describe (scanned again to say what is wrong)."""
        out = []
        for k, s in enumerate(self.shards):
            try:
                if _stamp(s["path"]) != (s["size"], s["mtime_ns"]) or (s["truncated"] and "damage" not in s):
                    out.append(k)
            except FileNotFoundError:
                out.append(k)
        return out

    def rows(self, k: int) -> slice:
        s = self.shards[k]
        return slice(s["start"], s["start"] + s["samples"])

    def damaged(self) -> list[dict[str, Any]]:
        """The shards that are not whole (``damage(shard)`` says why)."""
        return [s for s in self.shards if damage(s)]

    def check(self, named: int = 5) -> list[str]:
        """Lines naming the damaged shards (the first ``named``) and what is wrong with each; raises
        ``ValueError`` when the set holds no sample at all."""
        bad = self.damaged()
        if not len(self):
            why = [f"{len(bad):,} damaged (first: {bad[0]['path']}: {damage(bad[0])})"] if bad else []
            if len(bad) < len(self.shards):
                why.append(f"{'the others hold' if bad else 'they hold'} no KEY.{'|'.join(IMAGE_EXTENSIONS)} member")
            raise ValueError(f"no usable sample in {len(self.shards):,} shard(s): {'; '.join(why)}")
        if not bad:
            return []
        lines = [f"damaged: {len(bad):,} of {len(self.shards):,} shards; their whole samples are used, the rest is lost"]
        lines += [f"  {s['path']}: {damage(s)} ({s['samples']:,} whole samples)" for s in bad[:named]]
        if len(bad) > named:
            lines.append(f"  ... and {len(bad) - named:,} more (m3i data info --json lists them all)")
        return lines


def damage(shard: dict[str, Any]) -> str | None:
    """What is wrong with one shard of an index's header, or None when it is whole (an index written
    before damage was described says only that it is truncated)."""
    return shard.get("damage") or ("truncated" if shard.get("truncated") else None)


def _write(path: Path, paths: Sequence[str], stamps: Sequence[tuple[int, int]], parts: Sequence[ShardScan]) -> None:
    """Merge the shards' scans (in shard order) into one index file, written atomically, part
    by part (the set's arrays are never held whole in memory a second time)."""
    labels: dict[str, int] = {}
    shards, remaps = [], []
    start = 0
    for p, (size, mtime), part in zip(paths, stamps, parts):
        remaps.append(np.asarray([labels.setdefault(v, len(labels)) for v in part.labels] + [-1], dtype=np.int32))
        n = len(part.key_len)
        shards.append({"path": p, "size": size, "mtime_ns": mtime, "start": start, "samples": n,
                       "members": part.members, "no_image": part.no_image, "cut": part.cut,
                       "truncated": part.truncated, "damage": part.damage})
        start += n
    key_bytes = sum(len(part.keys) for part in parts)
    types = {**_FIELDS, "key_end": np.uint32 if key_bytes < 2**32 else np.uint64, "keys": np.uint8}
    counts = {k: key_bytes if k == "keys" else start for k in types}
    header = {"format": FORMAT, "created": time.time(), "shards": shards, "labels": list(labels), "arrays": {}}
    at0 = _align(len(MAGIC) + 8 + len(json.dumps(header)))
    while True:  # the header holds the arrays' offsets, which follow the header
        at = at0
        for k, t in types.items():
            header["arrays"][k] = {"dtype": np.dtype(t).str, "shape": [counts[k]], "offset": at}
            at = _align(at + counts[k] * np.dtype(t).itemsize)
        raw = json.dumps(header).encode()
        if len(MAGIC) + 8 + len(raw) <= at0:
            break
        at0 = _align(len(MAGIC) + 8 + len(raw))
    tmp = path.with_name(path.name + f".{os.getpid()}.partial")
    with open(tmp, "wb") as f:
        f.write(MAGIC + len(raw).to_bytes(8, "little") + raw)
        for k, t in types.items():
            f.seek(header["arrays"][k]["offset"])
            end = 0
            for part, remap in zip(parts, remaps):
                if k == "keys":
                    f.write(part.keys)
                    continue
                if k == "key_end":
                    a = end + np.cumsum(part.key_len)
                    end += int(part.key_len.sum())
                else:
                    a = remap[part.arrays[k]] if k == "label" else part.arrays[k]
                f.write(np.ascontiguousarray(a, dtype=t).tobytes())
        f.truncate(_align(f.tell()))
    os.replace(tmp, path)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK) if folder.is_dir() else _writable(folder.parent) if folder != folder.parent else False


def _scan_all(paths: Sequence[str], processes: int | None, progress: bool, what: str) -> list[ShardScan]:
    from tqdm import tqdm

    n = len(paths)
    procs = max(1, min(processes or os.cpu_count() or 1, n))
    print(f"m3i: indexing {what} with {procs} process{'es' if procs > 1 else ''}", file=sys.stderr, flush=True)
    bar = tqdm(total=n, unit="shard", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        if procs == 1:
            out = []
            for p in paths:
                out.append(scan_shard(p))
                bar.update(1)
            return out
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(procs, mp_context=ctx) as pool:
            out = []
            for part in pool.map(scan_shard, paths, chunksize=max(1, min(16, n // (4 * procs)))):
                out.append(part)
                bar.update(1)
            return out
    finally:
        bar.close()


def open_index(paths: Sequence[str], *, processes: int | None = None, progress: bool = True,
               rebuild: bool = False) -> ShardIndex:
    """The index of the shards ``paths`` (in this order): opened if it exists and every shard
    is unchanged, else built (or its changed shards scanned again) and written, then opened."""
    paths = [os.path.abspath(p) for p in paths]
    candidates = index_paths(paths)
    existing = next((c for c in candidates if c.is_file()), None)
    if existing is not None and not rebuild:
        idx = _try_open(existing, quiet=True)
        if idx is not None and not idx.stale():
            return idx
    target = existing or next((c for c in candidates if _writable(c.parent)), candidates[-1])
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        idx = None if rebuild else _try_open(target) if target.is_file() else None
        stale = list(range(len(paths))) if idx is None else idx.stale()
        if idx is not None and not stale:
            return idx  # another process built it while this one waited
        stamps = [_stamp(p) for p in paths]
        if idx is not None:
            first = idx.shards[stale[0]]
            why = "damaged, described anew" if first["truncated"] and "damage" not in first else "size or mtime differ"
            msg = (f"shard index {target} is stale: {len(stale)} of {len(paths)} shards changed since it was built "
                   f"(first: {first['path']}: {why}); scanning them again")
            warnings.warn(msg, stacklevel=3)  # once: a logging line as well printed it twice
            scans = dict(zip(stale, _scan_all([paths[k] for k in stale], processes, progress,
                                              f"{len(stale)} changed shard(s)")))
            parts = [scans[k] if k in scans else _part_of(idx, k) for k in range(len(paths))]
        else:
            parts = _scan_all(paths, processes, progress, f"{len(paths)} shard(s) -> {target}")
        _write(target, paths, stamps, parts)
    return ShardIndex(target)


def _try_open(path: Path, quiet: bool = False) -> ShardIndex | None:
    try:
        return ShardIndex(path)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        if quiet:
            return None
        msg = f"shard index {path} is unreadable ({e}); building it again"
        warnings.warn(msg, stacklevel=4)
        return None


def _part_of(idx: ShardIndex, k: int) -> ShardScan:
    """Shard ``k``'s rows of an existing index, as a scan would give them."""
    rows = idx.rows(k)
    s = idx.shards[k]
    arrays = {name: np.asarray(getattr(idx, name)[rows]) for name in _FIELDS}
    ends = np.asarray(idx.key_end[rows], dtype=np.int64)
    begin = int(idx.key_end[rows.start - 1]) if rows.start else 0
    lens = np.diff(np.concatenate([[begin], ends]))
    keys = bytes(idx.keys[begin:int(ends[-1])]) if len(ends) else b""
    used = np.unique(arrays["label"][arrays["label"] >= 0])
    table = [idx.labels[c] for c in used]  # codes re-numbered within the shard
    remap = np.full(len(idx.labels) + 1, -1, np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)
    arrays["label"] = remap[arrays["label"]]
    return ShardScan(arrays, keys, lens, table, s["members"], s["no_image"], s["cut"], s["truncated"], damage(s))


class _locked:
    """An exclusive lock beside ``path`` (``PATH.lock``) while the index is checked and built."""

    def __init__(self, path: Path):
        self.lock = path.with_name(path.name + ".lock")

    def __enter__(self):
        self.f = open(self.lock, "a+")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
