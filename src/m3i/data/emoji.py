"""Google's Noto Emoji, captioned by name (spec ``emoji[:category|subcategory|none][:SPLIT]``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .images import FETCH_HINT, DamagedSet, data_root, decode_image

from .source import Source
from .spec import Spec, register_source
from .splits import SPLITS, grouped_split

EMOJI_PACKAGE = "emoji-datasource-google@16.0.0"


class Emoji(Source):
    """Google's Noto Emoji from the npm package ``emoji-datasource-google`` (16.0.0).

    ``root`` holds ``emoji.json`` and ``img/google/64/*.png`` (the package folder, or the
    trimmed copy that ``m3i data fetch`` writes); it defaults to ``$M3I_DATA/emoji``
    (``~/.cache/m3i/emoji``). Samples: the base emoji with a Google image (1,911 in 16.0.0;
    skin-tone variants excluded), ordered by ``sort_order``. Caption: the lower-cased name.
    Label: ``category`` (10 classes), ``subcategory`` (99) or ``None``. RGBA is composited on
    white. ``split``: ``train`` (the default), ``test``, ``fit`` or ``val`` of the one seeded
    split in :mod:`m3i.data.splits`; the class list is the same in every split.
    """

    provides_captions = True
    image_files = True

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
        entries = self._entries(meta)
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

    def _entries(self, meta: Path) -> list[dict]:
        """The base emoji with a Google image, in ``sort_order``; a damaged ``emoji.json`` or a
        listed image missing from ``img/google/64`` is one line naming it."""
        try:
            with open(meta, encoding="utf-8") as f:
                entries = json.load(f)
        except ValueError as e:  # not JSON, not UTF-8, cut short
            raise DamagedSet(meta, f"not readable JSON: {' '.join(str(e).split())[:120]}", "emoji") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise DamagedSet(meta, "expected a JSON list of emoji objects", "emoji")
        entries = [e for e in entries if e.get("has_img_google") and isinstance(e.get("image"), str)]
        entries.sort(key=lambda e: (e.get("sort_order", 0), e["image"]))
        self._require_samples(len(entries), f"{meta} lists no emoji with has_img_google")
        missing = [e["image"] for e in entries if not (self.image_dir / e["image"]).is_file()]
        if missing:
            raise DamagedSet(self.image_dir, f"{len(missing):,} of the {len(entries):,} images emoji.json lists are "
                          f"missing (first: {missing[0]})", "emoji")
        return entries

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


@register_source("emoji", "emoji[:category|subcategory|none][:train|test|fit|val|all]",
                 evaluated=("emoji:category", "emoji:subcategory", "emoji:none"),
                 monitored=("emoji:category", "emoji:category"))
def _build(spec: Spec) -> Emoji:
    field, split = "category", "train"
    for part in (p.strip().lower() for p in (spec.arg or "").split(":") if p.strip()):
        if part in ("category", "subcategory", "none"):
            field = part
        elif part in SPLITS:
            split = part
        else:
            raise spec.error(f"emoji takes a label (category, subcategory, none) and a split "
                             f"({', '.join(SPLITS)}), got {part!r}")
    return Emoji(label=None if field == "none" else field, split=split, **spec.common)
