"""Sources named by short specs, as recipes and the command line write them.

Accepted specs::

    fashion-mnist[:train|test|fit|val]       Fashion-MNIST (10 classes, no captions)
    emoji[:category|subcategory|none][:train|test|fit|val|all]
                                             Noto Emoji, caption = name, label as given

The splits are those of :mod:`m3i.data.splits`; a built-in set without a split named is its
``train`` part, so a test item is never drawn unless ``:test`` is asked for.
    digits[:train|test|fit|val|all]          UCI handwritten digits, 8×8 (evaluation only)
    folder:PATH                              ImageFolder (class subfolders or flat)
    manifest:PATH                            JSONL/CSV manifest (path, caption[, label])
    shards:PATTERN                           WebDataset tar shards (brace pattern, glob, path)

Annotations can be hidden with the keyword arguments ``labels=False`` / ``captions=False`` or
with a suffix on the spec: ``fashion-mnist:train?labels=false``,
``emoji?captions=0&labels=0``.
"""

from __future__ import annotations

import re

from .splits import SPLITS
from .sources import Digits, Emoji, FashionMNIST, ImageFolder, Manifest, Shards, Source, data_root

__all__ = ["SPEC_FORMS", "builtin_source", "data_root", "parse_spec"]

SPEC_FORMS = (
    "fashion-mnist[:train|test|fit|val]",
    "emoji[:category|subcategory|none][:train|test|fit|val|all]",
    "digits[:train|test|fit|val|all]",
    "folder:PATH",
    "manifest:PATH",
    "shards:PATTERN",
)
_OPTIONS = re.compile(r"\?((?:labels|captions)=(?:true|false|1|0|yes|no)(?:&(?:labels|captions)=(?:true|false|1|0|yes|no))*)$",
                      re.IGNORECASE)


def _unknown(spec: str, why: str) -> ValueError:
    return ValueError(
        f"unknown data source spec {spec!r} ({why}); accepted forms: {', '.join(SPEC_FORMS)}, "
        "optionally followed by ?labels=false and/or &captions=false"
    )


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, bool]]:
    """Split a spec into (kind, argument or None, options)."""
    if not isinstance(spec, str) or not spec.strip():
        raise _unknown(str(spec), "empty")
    spec = spec.strip()
    options: dict[str, bool] = {}
    m = _OPTIONS.search(spec)
    body = spec
    if m:
        body = spec[: m.start()]
        for item in m.group(1).split("&"):
            key, value = item.split("=")
            options[key.lower()] = value.lower() in ("true", "1", "yes")
    kind, sep, arg = body.partition(":")
    return kind.strip().lower(), (arg if sep else None), options


def builtin_source(spec: str, *, labels: bool = True, captions: bool = True,
                   name: str | None = None) -> Source:
    """Build the source a spec names (see the module docstring for the forms).

    ``labels`` / ``captions`` hide annotations; an option suffix on the spec can only hide
    more (both must allow an annotation for it to be kept).
    """
    kind, arg, options = parse_spec(spec)
    labels = labels and options.get("labels", True)
    captions = captions and options.get("captions", True)
    common = dict(labels=labels, captions=captions, name=name)
    if kind in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        split = (arg or "train").strip().lower()
        if split not in SPLITS:
            raise _unknown(spec, f"Fashion-MNIST split must be one of {', '.join(SPLITS)}, got {split!r}")
        return FashionMNIST(split=split, **common)
    if kind == "emoji":
        field, split = "category", "train"
        for part in (p.strip().lower() for p in (arg or "").split(":") if p.strip()):
            if part in ("category", "subcategory", "none"):
                field = part
            elif part in SPLITS:
                split = part
            else:
                raise _unknown(spec, f"emoji takes a label (category, subcategory, none) and a split "
                                     f"({', '.join(SPLITS)}), got {part!r}")
        return Emoji(label=None if field == "none" else field, split=split, **common)
    if kind == "digits":
        split = (arg or "train").strip().lower()
        if split not in SPLITS:
            raise _unknown(spec, f"digits split must be one of {', '.join(SPLITS)}, got {split!r}")
        return Digits(split=split, **common)
    if kind in ("folder", "manifest", "shards"):
        if not arg:
            raise _unknown(spec, f"{kind}: needs a path")
        cls = {"folder": ImageFolder, "manifest": Manifest, "shards": Shards}[kind]
        return cls(arg, **common)
    raise _unknown(spec, f"kind {kind!r} not recognised")
