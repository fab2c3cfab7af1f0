"""Sources named by short specs, as recipes and the command line write them.

A spec is ``KIND[:ARGUMENT]``. Each format module registers its kind with
:func:`register_source`, and :func:`build_source` builds the source a spec names:

    fashion-mnist[:train|test|fit|val]       Fashion-MNIST (10 classes, no captions)
    emoji[:category|subcategory|none][:train|test|fit|val|all]
                                             Noto Emoji, caption = name, label as given
    digits[:train|test|fit|val|all]          UCI handwritten digits, 8×8 (evaluation only)
    folder:PATH                              ImageFolder (class subfolders or flat)
    manifest:PATH                            JSONL/CSV manifest (path, caption[, label])
    shards:PATTERN                           WebDataset tar shards (brace pattern, glob, path)

The splits are those of :mod:`m3i.data.splits`; a built-in set without a split named is its
``train`` part, so a test item is never drawn unless ``:test`` is asked for.

Annotations can be hidden with the keyword arguments ``labels=False`` / ``captions=False`` or
with a suffix on the spec: ``fashion-mnist:train?labels=false``,
``emoji?captions=0&labels=0``.

A new format is one module that registers a builder for its kind::

    @register_source("tiles", "tiles:PATH")
    def _tiles(spec: Spec) -> Tiles:
        return Tiles(spec.path(), **spec.common)

A kind also says what ``m3i eval --dataset`` can score of it (``evaluated``) and which of those a
pre-training on it is monitored on (``monitored``): the built-in sets name their seeded splits.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..registry import Definer, definer_of, did_you_mean, is_new
from .source import Source

__all__ = ["EVAL_DATASETS", "SPEC_FORMS", "Spec", "absolute_spec", "build_source", "evaluated_as", "monitored_on",
           "parse_spec", "register_source"]

_OPTIONS = re.compile(r"\?((?:labels|captions)=(?:true|false|1|0|yes|no)(?:&(?:labels|captions)=(?:true|false|1|0|yes|no))*)$",
                      re.IGNORECASE)
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*:")


@dataclass(frozen=True)
class Spec:
    """A parsed spec, as a builder receives it."""

    text: str  # the spec as written, for messages
    kind: str  # the registered kind (an alias is resolved)
    arg: str | None  # what follows the first ':', None without one
    labels: bool  # the keyword argument and the ``?labels=`` option both keep labels
    captions: bool
    name: str | None  # the source's name, None for its default

    @property
    def common(self) -> dict[str, Any]:
        """The keyword arguments every source takes: ``labels``, ``captions`` and ``name``."""
        return {"labels": self.labels, "captions": self.captions, "name": self.name}

    def error(self, why: str) -> ValueError:
        """The error for a malformed spec: says why and lists the accepted forms."""
        return _unknown(self.text, why)

    def path(self) -> str:
        """The argument as a path or pattern; an error when there is none."""
        if not self.arg:
            raise self.error(f"{self.kind}: needs a path")
        return self.arg


Builder = Callable[[Spec], Source]
B = TypeVar("B", bound=Builder)


@dataclass(frozen=True)
class _Kind:
    names: tuple[str, ...]  # the kind, then its aliases
    form: str
    build: Builder
    definer: Definer  # who registered it, for messages and a run's plugins
    evaluated: tuple[str, ...] = ()  # the `m3i eval --dataset` names it offers (the first: its default)
    monitored: tuple[str | None, str | None] = (None, None)  # (k-NN, retrieval) data sets it is monitored on


_KINDS: dict[str, _Kind] = {}  # every name of every kind; registration order is the order of the forms


def register_source(kind: str, form: str, *, aliases: Sequence[str] = (), evaluated: Sequence[str] = (),
                    monitored: tuple[str | None, str | None] = (None, None)) -> Callable[[B], B]:
    """Decorator: ``builder(spec: Spec) -> Source`` builds the specs of ``kind`` (or of one of
    its ``aliases``); ``form`` is how messages and :data:`SPEC_FORMS` write the spec.

    ``evaluated``: the ``m3i eval --dataset`` names the kind offers, each ``NAME`` scored on the
    parts ``NAME:train|test|fit|val`` (the splits of :mod:`m3i.data.splits`), or ``KIND:PATH``: a
    folder scored on the parts of its layout (:mod:`m3i.data.layout`); the first is what the bare
    kind names. ``monitored``: the (k-NN, retrieval) data sets among them that a pre-training on a
    labelled (captioned) source of this kind is monitored on (``train.eval_every``)."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in (kind, *aliases)))
    for n in names:
        if not _NAME.fullmatch(n):
            raise ValueError(f"data source kind {n!r}: expected lower-case letters, digits, '-', '_' or '.'")

    def register(build: B) -> B:
        by = definer_of(build, settings=(names, form))
        free = [is_new("data source kind", n, _KINDS[n].definer if n in _KINDS else None, by) for n in names]
        if all(free):
            entry = _Kind(names, form, build, by, tuple(evaluated), tuple(monitored))
            for n in names:
                _KINDS[n] = entry
        return build

    return register


class _Listing(Sequence[str]):
    """What each kind registered (``of(kind)``: a tuple), in registration order, read from the
    registry when used."""

    def __init__(self, of: Callable[[_Kind], tuple[str, ...]]):
        self._of = of

    def _all(self) -> tuple[str, ...]:
        return tuple(x for n, k in _KINDS.items() if n == k.names[0] for x in self._of(k))

    def __getitem__(self, i):  # an int gives a form, a slice a tuple of them
        return self._all()[i]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and self._all() == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._all())


SPEC_FORMS: Sequence[str] = _Listing(lambda k: (k.form,))
# what `m3i eval --dataset` takes
EVAL_DATASETS: Sequence[str] = _Listing(lambda k: k.evaluated)


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


def evaluated_as(dataset: str) -> tuple[str, ...]:
    """The ``m3i eval --dataset`` names the kind of ``dataset`` offers (none: an unknown kind)."""
    entry = _KINDS.get(dataset.partition(":")[0].strip().lower())
    return entry.evaluated if entry else ()


def monitored_on(spec: str) -> tuple[str | None, str | None]:
    """The (k-NN, retrieval) data sets a pre-training on the source ``spec`` is monitored on."""
    entry = _KINDS.get(parse_spec(spec)[0])
    return entry.monitored if entry else (None, None)


def module_of_spec(spec: str) -> str | None:
    """The module that registered the kind of ``spec`` (None: no such kind)."""
    try:
        entry = _KINDS.get(parse_spec(spec)[0])
    except ValueError:
        return None
    return entry.definer.module if entry else None


def absolute_spec(spec: str) -> str:
    """``spec`` with a relative path argument made absolute from the working directory (options
    kept); specs of kinds without a path (``KIND:PATH`` / ``KIND:PATTERN`` forms), URLs and
    absolute paths are returned as they are."""
    kind, arg, _ = parse_spec(spec)
    entry = _KINDS.get(kind)
    if entry is None or not arg or not re.search(r":(PATH|PATTERN)$", entry.form) or _URL.match(arg):
        return spec
    m = _OPTIONS.search(spec.strip())
    body, options = (spec.strip()[: m.start()], m.group(0)) if m else (spec.strip(), "")
    head, _, path = body.partition(":")
    path = os.path.expanduser(path)
    return spec if os.path.isabs(path) else f"{head}:{os.path.abspath(path)}{options}"


def build_source(spec: str, *, labels: bool = True, captions: bool = True,
                 name: str | None = None) -> Source:
    """Build the source a spec names (see the module docstring for the forms).

    ``labels`` / ``captions`` hide annotations; an option suffix on the spec can only hide
    more (both must allow an annotation for it to be kept).
    """
    kind, arg, options = parse_spec(spec)
    entry = _KINDS.get(kind)
    if entry is None:
        raise _unknown(spec, f"kind {kind!r} not recognised{did_you_mean(kind, _KINDS)}")
    return entry.build(Spec(text=spec, kind=entry.names[0], arg=arg,
                            labels=labels and options.get("labels", True),
                            captions=captions and options.get("captions", True), name=name))
