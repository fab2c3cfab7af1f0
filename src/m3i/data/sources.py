"""Map-style image sources with random access.

Every source is a sequence of samples addressed by index. ``get(i)`` returns a dict with

- ``image``: a decoded ``PIL.Image`` in RGB (transparency composited on white),
- ``label``: an ``int`` class index, ``-1`` for none,
- ``caption``: a ``str`` or ``None``.

Sources carry ``name``, ``num_classes`` (0 when the source has no labels or they are hidden)
and ``class_names``. Two switches hide annotations so that a labelled or captioned set can
also serve as plain images: ``labels=False`` and ``captions=False``.

Formats: :class:`ImageFolder` (class subfolders or a flat folder), :class:`Manifest` (JSONL or
CSV listing ``path``, ``caption`` and an optional ``label``), :class:`Shards` (WebDataset tar
shards in the LAION layout, indexed once for random access) and the two built-in sets,
:class:`FashionMNIST` (IDX gzip files) and :class:`Emoji` (npm ``emoji-datasource-google``).

Decoding errors are not caught here: ``get`` raises (``OSError``, ``ValueError``, ...) and the
mixture decides what to do (skip and count). ``locate(i)`` names the file behind a sample for
error messages. Entries that are broken before any image is read (a manifest row without a
path or with a non-integer label, the unreadable tail of a truncated shard) are dropped while
indexing and counted in ``num_dropped`` (reasons in ``dropped``). A caption that is empty,
longer than ``MAX_CAPTION_CHARS`` or not UTF-8 is dropped (the image is kept without it).
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import logging
import os
import re
import struct
import tarfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .splits import SPLITS, grouped_split, inner_split

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order inside one sample
FETCH_HINT = "fetch it with `make data` or `scripts/fetch_data.sh`"
MAX_CAPTION_CHARS = 10_000

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
EMOJI_PACKAGE = "emoji-datasource-google@16.0.0"


def data_root() -> Path:
    """Folder holding the built-in data sets: ``$M3I_DATA`` if set, else ``~/.cache/m3i``."""
    env = os.environ.get("M3I_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "m3i"


# --------------------------------------------------------------------------------------------
# Decoding helpers


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited on white, 16-bit gray
    is scaled to 8 bits (PIL's own conversion would clip it to white)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.int64)
        a = a >> 8 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else a
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


def decode_image(src: str | os.PathLike | bytes, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode a file path or encoded bytes into a fully loaded RGB image.

    ``draft`` (width, height) lets JPEG decoding pick a reduced scale that still covers that
    size, which makes decoding large photos for small training resolutions much cheaper.
    Raises on unreadable, truncated or non-image data.
    """
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # above the limit: refuse, never decode
        with Image.open(fp) as im:
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", draft)
            im.load()
            return to_rgb(im)


# --------------------------------------------------------------------------------------------
# Base class


class Source:
    """Base class of all sources: indexing, annotation switches and the sample dict.

    Subclasses implement ``__len__``, ``_image(i, draft)``, and where they have annotations
    ``_label(i)`` / ``_caption(i)``, ``_all_captions()`` and ``locate(i)``. They set
    ``self._class_names`` (empty when the data has no labels) and ``provides_captions``.
    """

    provides_captions: bool = False

    def __init__(self, *, labels: bool = True, captions: bool = True, name: str | None = None):
        self.labels = bool(labels)
        self.captions = bool(captions)
        self.name = name or type(self).__name__
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
        image = self._image(i, draft)
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

    def _drop(self, reason: str) -> None:
        self.num_dropped += 1
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
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        return None, "not UTF-8"
    if len(text) > MAX_CAPTION_CHARS:
        return None, f"longer than {MAX_CAPTION_CHARS} characters"
    return text, None


def _label_value(raw: Any) -> int | None:
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


# --------------------------------------------------------------------------------------------
# Image folders


class ImageFolder(Source):
    """Images under ``root``, searched recursively (jpg, jpeg, png, webp, bmp; any case).

    If ``root`` holds class subfolders and no loose images, each subfolder that contains images
    is a class; classes are the sorted folder names. If images lie directly in ``root`` (a flat
    folder), the source has no labels and every image below ``root`` is a sample.
    """

    def __init__(self, root: str | os.PathLike, labels: bool = True, captions: bool = True,
                 name: str | None = None):
        super().__init__(labels=labels, captions=captions, name=name or f"folder:{root}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {str(self.root)!r} not found: expected a directory of images "
                f"({', '.join(IMAGE_EXTENSIONS)}), either flat or one subfolder per class"
            )
        entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        loose = [e for e in entries if e.is_file() and _is_image(e.name)]
        subdirs = [e for e in entries if e.is_dir()]
        paths: list[str] = []
        targets: list[int] = []
        if loose or not subdirs:
            paths = _walk_images(self.root)
        else:
            for d in subdirs:
                found = _walk_images(Path(d.path))
                if not found:
                    continue
                targets.extend([len(self._class_names)] * len(found))
                self._class_names.append(d.name)
                paths.extend(found)
        self._require_samples(len(paths), f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.paths = paths
        self.targets = np.asarray(targets, dtype=np.int64) if targets else None

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, i, draft):
        return decode_image(self.paths[i], draft)

    def _label(self, i):
        return int(self.targets[i]) if self.targets is not None else -1

    def locate(self, i):
        return self.paths[i]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return out


# --------------------------------------------------------------------------------------------
# Manifests


class Manifest(Source):
    """Image-text (and optionally label) pairs listed in a JSONL or CSV file.

    Fields: ``path`` (relative to the manifest's folder, or absolute), ``caption``, and an
    optional integer ``label`` (``-1`` or empty for none). JSONL is one object per line (blank
    lines ignored); CSV has a header row. The format follows the extension (``.jsonl``,
    ``.json``, ``.ndjson`` or ``.csv``), otherwise the first character (``{`` means JSONL).

    A row with invalid JSON, a missing field or a bad label is dropped and counted in
    ``num_dropped`` (the reasons name the file, line and field); a CSV header without ``path``
    and ``caption`` raises ``ValueError``. Rows whose caption is empty, huge or not UTF-8 are
    kept without a caption (``num_bad_captions``). Both counts are reported once as a warning.
    A missing image file is found when it is read, and skipped by the mixture like any other
    unreadable image.
    """

    provides_captions = True

    def __init__(self, path: str | os.PathLike, labels: bool = True, captions: bool = True,
                 name: str | None = None):
        super().__init__(labels=labels, captions=captions, name=name or f"manifest:{path}")
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(
                f"manifest {str(self.path)!r} not found: expected a JSONL or CSV file with fields "
                "'path', 'caption' and optional 'label'"
            )
        base = self.path.parent
        paths: list[str] = []
        caps: list[str | None] = []
        labs: list[int] = []
        empty, bad_caps = 0, {}
        for line, row in self._rows():
            where = f"{self.path}:{line}"
            if isinstance(row, str):  # a row that is no JSON object
                self._drop(f"{where}: {row}")
                continue
            missing = [f for f in ("path", "caption") if f not in row or (f == "path" and row[f] is None)]
            if missing:
                self._drop(f"{where}: missing field {missing[0]!r}")
                continue
            p = str(row["path"]).strip()
            if not p:
                self._drop(f"{where}: field 'path' is empty")
                continue
            lab = _label_value(row.get("label"))
            if lab is None:
                self._drop(f"{where}: field 'label' must be an integer >= 0 (or -1/empty for none), "
                           f"got {row.get('label')!r}")
                continue
            cap, why = clean_caption(row["caption"])
            if why == "empty":
                empty += 1
            elif why:
                bad_caps.setdefault(why, f"{where}")
            paths.append(p if os.path.isabs(p) else str(base / p))
            caps.append(cap)
            labs.append(lab)
        self._require_samples(len(paths), f"{self.path} lists no usable row")
        self.num_bad_captions = sum(c is None for c in caps)  # empty, huge or not UTF-8
        if empty and self.captions:
            msg = (f"{self.path}: {empty} of {len(paths)} rows have an empty caption; "
                   "they are used without a caption")
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        if bad_caps and self.captions:
            msg = (f"{self.path}: {self.num_bad_captions - empty} captions are dropped ("
                   + ", ".join(f"{why}, first at {w}" for why, w in bad_caps.items()) + "); those images are used without a caption")
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        if self.num_dropped:
            msg = (f"{self.path}: {self.num_dropped} of {self.num_dropped + len(paths)} rows dropped "
                   f"(first: {self.dropped[0]})")
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        self.paths = paths
        self._captions = caps
        self.targets = np.asarray(labs, dtype=np.int64)
        top = int(self.targets.max())
        self._class_names = [str(c) for c in range(top + 1)] if top >= 0 else []
        self.num_empty_captions = empty

    def _format(self) -> str:
        ext = self.path.suffix.lower()
        if ext in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        if ext in (".csv",):
            return "csv"
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            head = f.read(1024).lstrip()
        return "jsonl" if head.startswith("{") else "csv"

    def _rows(self) -> Iterator[tuple[int, dict[str, Any] | str]]:
        """(line, row) pairs; the row is a string saying what is wrong when it cannot be parsed.
        Bytes that are not UTF-8 come through as surrogates (see :func:`clean_caption`)."""
        if self._format() == "jsonl":
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                for line, text in enumerate(f, start=1):
                    if not text.strip():
                        continue
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as e:
                        yield line, f"invalid JSON ({e.msg})"
                        continue
                    if not isinstance(row, dict):
                        yield line, f"expected a JSON object, got {type(row).__name__}"
                        continue
                    yield line, row
        else:
            with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                reader = csv.DictReader(f)
                header = reader.fieldnames or []
                for field in ("path", "caption"):
                    if field not in header:
                        raise ValueError(f"{self.path}:1: missing field {field!r} in the CSV header {header}")
                for row in reader:
                    # DictReader fills absent trailing cells with None
                    yield reader.line_num, {k: v for k, v in row.items() if v is not None and k is not None}

    def __len__(self):
        return len(self.paths)

    def _image(self, i, draft):
        return decode_image(self.paths[i], draft)

    def _label(self, i):
        return int(self.targets[i])

    def _caption(self, i):
        return self._captions[i]

    def _all_captions(self):
        return self._captions

    def locate(self, i):
        return self.paths[i]


# --------------------------------------------------------------------------------------------
# WebDataset shards

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
        raw = s.pop("cls_raw", None)
        lab = _label_value(raw)
        if lab is None:
            raise ValueError(f"shard {path!r}: {s['key']}.cls must hold an integer, got {raw!r}")
        s["label"] = lab
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
    (+ optional ``KEY.cls`` holding an integer label).

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
        top = -1
        for k, u in enumerate(self.urls):
            idx = index_shard(u)
            if shard_truncated(u):  # how many samples the cut took is unknown: counted as one
                self._drop(f"{u}: truncated; its samples up to the cut are used")
                msg = f"shard {u!r} is truncated; its {len(idx)} whole samples are used, the rest is lost"
                warnings.warn(msg, stacklevel=2)
                log.warning(msg)
            self._shard_index.append(idx)
            shard_of.append(np.full(len(idx), k, dtype=np.int32))
            for s in idx:
                top = max(top, s["label"])
        self._shard = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        counts = np.array([len(ix) for ix in self._shard_index], dtype=np.int64)
        self._start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._require_samples(len(self._shard), f"no KEY.jpg|png|jpeg|webp members in {len(self.urls)} shard(s)")
        self._class_names = [str(c) for c in range(top + 1)]
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
        return self._entry(i)[1]["label"]

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
            parsed = _label_value(sample["cls"].decode("utf-8", "replace"))
            label = -1 if parsed is None else parsed
        if self.has_captions and "txt" in sample:
            caption = sample["txt"].decode("utf-8", "replace").strip() or None
        return {"image": decode_image(sample[ext]), "label": int(label), "caption": caption,
                "key": sample["__key__"]}


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip or raw) of unsigned bytes into a numpy array."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
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


class GrayArraySource(Source):
    """A labelled set held in memory as ``images`` (N, H, W) uint8 and ``targets`` (N,), read from
    one file (``_images_file``) at the rows ``file_index``; gray images are returned as RGB."""

    images: np.ndarray
    targets: np.ndarray
    file_index: np.ndarray
    _images_file: Path

    def __len__(self):
        return len(self.images)

    def _image(self, i, draft):
        return Image.fromarray(np.repeat(self.images[i][:, :, None], 3, axis=2))

    def _label(self, i):
        return int(self.targets[i])

    def locate(self, i):
        return f"{self._images_file}[{int(self.file_index[i])}]"


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
        self.images = read_idx(images)
        self.targets = read_idx(labels_file).astype(np.int64)
        if self.images.ndim != 3 or len(self.images) != len(self.targets):
            raise ValueError(
                f"{images}: expected N×H×W images matching {labels_file}'s labels, got "
                f"{self.images.shape} and {self.targets.shape}"
            )
        # fit / val: the seeded inner split of the official train set (m3i.data.splits)
        self.file_index = (inner_split(len(self.images), split, self.N_VAL) if split in ("fit", "val")
                           else np.arange(len(self.images)))
        self.images, self.targets = self.images[self.file_index], self.targets[self.file_index]
        self._images_file = images
        self._require_samples(len(self.images), f"{images} holds no image")
        self._class_names = list(FASHION_MNIST_CLASSES)

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

class Digits(GrayArraySource):
    """The UCI handwritten digits (1,797 images, 8×8, 17 grey levels, classes 0–9), from
    ``$M3I_DATA/digits/digits.csv.gz`` (``scripts/fetch_data.sh digits``). No built-in mix
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
        with gzip.open(self.path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != 65:
            raise ValueError(f"{self.path}: expected rows of 64 pixel values and a label, got shape {rows.shape}")
        keep = grouped_split(range(len(rows)), split)
        self.file_index, self._images_file = keep, self.path
        self.images = np.round(rows[keep, :64] * (255 / 16)).clip(0, 255).astype(np.uint8).reshape(-1, 8, 8)
        self.targets = rows[keep, 64].astype(np.int64)
        self._require_samples(len(self.images), f"the {split!r} split of {self.path} is empty")
        self._class_names = [str(d) for d in range(10)]


# --------------------------------------------------------------------------------------------
# Emoji


class Emoji(Source):
    """Google's Noto Emoji from the npm package ``emoji-datasource-google`` (16.0.0).

    ``root`` holds ``emoji.json`` and ``img/google/64/*.png`` (the package folder, or the
    trimmed copy that ``scripts/fetch_data.sh`` writes); it defaults to ``$M3I_DATA/emoji``
    (``~/.cache/m3i/emoji``). Samples: the base emoji with a Google image (1,911 in 16.0.0;
    skin-tone variants excluded), ordered by ``sort_order``. Caption: the lower-cased name.
    Label: ``category`` (10 classes), ``subcategory`` (99) or ``None``. RGBA is composited on
    white. ``split``: ``train`` (the default), ``test``, ``fit`` or ``val`` of the one seeded
    split in :mod:`m3i.data.splits`; the class list is the same in every split.
    """

    provides_captions = True

    def __init__(self, root: str | os.PathLike | None = None, label: str | None = "category",
                 caption: bool = True, labels: bool = True, captions: bool = True,
                 name: str | None = None, split: str = "train"):
        if label not in ("category", "subcategory", None):
            raise ValueError(f"Emoji label must be 'category', 'subcategory' or None, got {label!r}")
        if split not in SPLITS:
            raise ValueError(f"Emoji split must be one of {', '.join(SPLITS)}, got {split!r}")
        super().__init__(labels=labels and label is not None, captions=captions and caption,
                         name=name or f"emoji:{label or 'none'}:{split}")
        self.split = split
        self.label_field = label
        self.root = Path(root).expanduser() if root is not None else data_root() / "emoji"
        meta = self.root / "emoji.json"
        self.image_dir = self.root / "img" / "google" / "64"
        if not meta.is_file() or not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"emoji data not found at {str(self.root)!r}: expected emoji.json and img/google/64/*.png "
                f"from the npm package {EMOJI_PACKAGE}; {FETCH_HINT}"
            )
        with open(meta, encoding="utf-8") as f:
            entries = json.load(f)
        entries = [e for e in entries if e.get("has_img_google") and e.get("image")]
        entries.sort(key=lambda e: (e.get("sort_order", 0), e["image"]))
        self._require_samples(len(entries), f"{meta} lists no emoji with has_img_google")
        names = [(e.get("name") or e.get("short_name") or "").strip().lower() or e["image"] for e in entries]
        keep = grouped_split(names, split)  # classes come from every emoji, samples from the split
        self.files = [str(self.image_dir / e["image"]) for e in entries]
        self._captions = [(e.get("name") or e.get("short_name") or "").strip().lower() or None for e in entries]
        if label is not None:
            values = [e.get(label) or "" for e in entries]
            self._class_names = sorted(set(values))
            pos = {c: k for k, c in enumerate(self._class_names)}
            self.targets = np.asarray([pos[v] for v in values], dtype=np.int64)[keep]
        else:
            self.targets = None
        self.files = [self.files[i] for i in keep]
        self._captions = [self._captions[i] for i in keep]
        self._require_samples(len(self.files), f"the {split!r} split of {meta} is empty")

    def __len__(self):
        return len(self.files)

    def _image(self, i, draft):
        return decode_image(self.files[i])

    def _label(self, i):
        return int(self.targets[i]) if self.targets is not None else -1

    def _caption(self, i):
        return self._captions[i]

    def _all_captions(self):
        return self._captions

    def locate(self, i):
        return self.files[i]
