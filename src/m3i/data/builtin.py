"""Sources named by short specs, as recipes and the command line write them.

Accepted specs::

    fashion-mnist[:train|test]               Fashion-MNIST (10 classes, no captions)
    emoji[:category|subcategory|none]        Noto Emoji, caption = name, label as given
    folder:PATH                              ImageFolder (class subfolders or flat)
    manifest:PATH                            JSONL/CSV manifest (path, caption[, label])
    shards:PATTERN                           WebDataset tar shards (brace pattern, glob, path)

Annotations can be hidden with the keyword arguments ``labels=False`` / ``captions=False`` or
with a suffix on the spec: ``fashion-mnist:train?labels=false``,
``emoji?captions=0&labels=0``.
"""

from __future__ import annotations

import re

from .sources import Emoji, FashionMNIST, ImageFolder, Manifest, Shards, Source, data_root

__all__ = ["SPEC_FORMS", "builtin_source", "data_root", "parse_spec"]

SPEC_FORMS = (
    "fashion-mnist[:train|test]",
    "emoji[:category|subcategory|none]",
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
        if split not in ("train", "test"):
            raise _unknown(spec, f"Fashion-MNIST split must be train or test, got {split!r}")
        return FashionMNIST(split=split, **common)
    if kind == "emoji":
        field = (arg or "category").strip().lower()
        if field not in ("category", "subcategory", "none"):
            raise _unknown(spec, f"emoji label must be category, subcategory or none, got {field!r}")
        return Emoji(label=None if field == "none" else field, **common)
    if kind in ("folder", "manifest", "shards"):
        if not arg:
            raise _unknown(spec, f"{kind}: needs a path")
        cls = {"folder": ImageFolder, "manifest": Manifest, "shards": Shards}[kind]
        return cls(arg, **common)
    raise _unknown(spec, f"kind {kind!r} not recognised")
