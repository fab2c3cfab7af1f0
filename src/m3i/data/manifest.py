"""Image-text (and label) pairs listed in a JSONL or CSV file (spec ``manifest:PATH``)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import numpy as np

from .index import COMPRESSED
from .images import decode_image, warn_once
from .source import Source, clean_caption, label_space
from .spec import Spec, register_source


class Manifest(Source):
    """Image-text (and optionally label) pairs listed in a JSONL or CSV file.

    Fields: ``path`` (relative to the manifest's folder, or absolute), ``caption``, and an
    optional ``label``: integer ids (``-1`` or empty for none), or class names when the first
    label is one (ids follow the sorted names, kept as ``class_names``). A byte-order mark (Excel's
    "CSV UTF-8") is read past. JSONL is one object per line (blank
    lines ignored); CSV has a header row. The format follows the extension (``.jsonl``,
    ``.json``, ``.ndjson`` or ``.csv``), otherwise the first character (``{`` means JSONL).

    A row with invalid JSON, a missing field or a bad label (neither an id, a name nor empty) is dropped and counted in
    ``num_dropped`` (the reasons name the file, line and field); a CSV header without ``path``
    and ``caption`` raises ``ValueError``. Rows whose caption is empty, huge or not UTF-8 are
    kept without a caption (``num_bad_captions``). Both counts are reported once as a warning.
    A missing image file is found when it is read, and skipped by the mixture like any other
    unreadable image.
    """

    provides_captions = True
    image_files = True

    def __init__(self, path: str | os.PathLike, labels: bool = True, captions: bool = True,
                 name: str | None = None):
        super().__init__(labels=labels, captions=captions, name=name or f"manifest:{path}")
        self.path = Path(path).expanduser()
        self._check_file()
        paths, caps, cells, wheres, empty, bad_caps = self._read()
        labs, self._class_names = label_space(cells)
        if None in labs:  # a cell neither an id, a name nor empty
            keep = [i for i, lab in enumerate(labs) if lab is not None]
            kind = "an integer id >= 0" if all(c.isdigit() for c in self._class_names) else "a class name"
            for i in (i for i, lab in enumerate(labs) if lab is None):
                self._drop(f"{wheres[i]}: field 'label' must be {kind}, as the file's first label is (or -1/empty "
                           f"for none); got {cells[i]!r}")
            paths, caps, labs = [paths[i] for i in keep], [caps[i] for i in keep], [labs[i] for i in keep]
        self._require_samples(len(paths), f"{self.path} lists no usable row")
        self.num_bad_captions = sum(c is None for c in caps)  # empty, huge or not UTF-8
        self.num_empty_captions = empty
        self._warn(len(paths), bad_caps)
        self.paths = paths
        self._captions = caps
        self.targets = np.asarray(labs, dtype=np.int64)
        self.provides_captions = any(c is not None for c in caps)

    def _check_file(self) -> None:
        """A manifest that is missing, a folder, empty, compressed or no text stops here, named."""
        what = "a JSONL or CSV file with fields 'path', 'caption' and optional 'label'"
        if self.path.is_dir():
            raise ValueError(f"manifest {str(self.path)!r} is a folder: expected {what} (a folder of images is "
                             f"folder:{self.path})")
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest {str(self.path)!r} not found: expected {what}")
        with open(self.path, "rb") as f:
            head = f.read(4096)
        if not head:
            raise ValueError(f"manifest {str(self.path)!r} is empty (0 bytes): expected {what}")
        packed = next((k for magic, k in COMPRESSED if head.startswith(magic)), None)
        if packed:
            raise ValueError(f"manifest {str(self.path)!r} is {packed}-compressed: decompress it ({what})")
        if head[:2] in (b"\xff\xfe", b"\xfe\xff") or head.count(0) > len(head) // 8:  # UTF-16 ("Unicode text")
            raise ValueError(f"manifest {str(self.path)!r} is not UTF-8 text (UTF-16, or binary): save it as UTF-8, "
                             f"{what}")

    def _read(self) -> tuple[list[str], list[str | None], list[Any], list[str], int, dict[str, str]]:
        """The usable rows: image paths, captions (None when dropped), label cells and where each
        row is; how many captions are empty, and the first row of each other reason a caption was
        dropped. Unusable rows are dropped and counted."""
        base = self.path.parent
        paths, caps, cells, wheres = [], [], [], []
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
            cap, why = clean_caption(row["caption"])
            if why == "empty":
                empty += 1
            elif why:
                bad_caps.setdefault(why, f"{where}")
            paths.append(p if os.path.isabs(p) else str(base / p))
            caps.append(cap)
            cells.append(row.get("label"))
            wheres.append(where)
        return paths, caps, cells, wheres, empty, bad_caps

    def _warn(self, n: int, bad_caps: dict[str, str]) -> None:
        """Once: the rows with an empty caption, the captions dropped, the rows dropped."""
        empty = self.num_empty_captions
        if empty and self.captions:
            warn_once(f"{self.path}: {empty} of {n} rows have an empty caption; they are used without a caption")
        if bad_caps and self.captions:
            warn_once(f"{self.path}: {self.num_bad_captions - empty} captions are dropped ("
                      + ", ".join(f"{why}, first at {w}" for why, w in bad_caps.items())
                      + "); those images are used without a caption")
        if self.num_dropped:
            warn_once(f"{self.path}: {self.num_dropped} of {self.num_dropped + n} rows dropped "
                      f"(first: {self.dropped[0]})")

    def _format(self) -> str:
        ext = self.path.suffix.lower()
        if ext in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        if ext in (".csv",):
            return "csv"
        with open(self.path, encoding="utf-8-sig", errors="surrogateescape") as f:
            head = f.read(1024).lstrip()
        return "jsonl" if head.startswith("{") else "csv"

    def _rows(self) -> Iterator[tuple[int, dict[str, Any] | str]]:
        """(line, row) pairs; the row is a string saying what is wrong when it cannot be parsed.
        Bytes that are not UTF-8 come through as surrogates (see :func:`clean_caption`)."""
        if self._format() == "jsonl":
            with open(self.path, encoding="utf-8-sig", errors="surrogateescape") as f:
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
            yield from self._csv_rows()

    def _csv_rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        limit = csv.field_size_limit(2**31 - 1)  # a caption past csv's 128 KiB is dropped as huge, not fatal
        try:
            with open(self.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
                reader = csv.DictReader(f)
                header = reader.fieldnames or []
                if any(0xDC80 <= ord(c) <= 0xDCFF for h in header for c in h):  # bytes that are not UTF-8
                    raise ValueError(f"{self.path}:1: the header row is not UTF-8 text; expected a CSV file whose "
                                     "header names 'path' and 'caption' (and optionally 'label')")
                for field in ("path", "caption"):
                    if field not in header:
                        shown = ", ".join(repr(h[:40]) for h in header[:5]) + (", ..." if len(header) > 5 else "")
                        raise ValueError(f"{self.path}:1: missing field {field!r} in the CSV header [{shown}]")
                for row in reader:
                    # DictReader fills absent trailing cells with None
                    yield reader.line_num, {k: v for k, v in row.items() if v is not None and k is not None}
        except csv.Error as e:
            raise ValueError(f"{self.path}:{reader.line_num}: not readable as CSV ({e})") from None
        finally:
            csv.field_size_limit(limit)

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


@register_source("manifest", "manifest:PATH")
def _build(spec: Spec) -> Manifest:
    return Manifest(spec.path(), **spec.common)
