"""Registries of parts: a name (the ``kind`` a recipe writes) mapped to the class that implements it.

A part registers itself where it is defined (``@ESTIMATORS.register``), in m3i or in a user's own
module (a plugin, :mod:`m3i.plugins`); every module of a parts package is imported when the
package is (:func:`import_parts`), so a new part is one new file: nothing else lists it. The
recipe schema is built from the registries when a recipe is loaded, so a kind registered by a
plugin validates like a built-in one.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar, get_args
from collections.abc import Iterator

T = TypeVar("T")


class Registry(Generic[T]):
    """``kind`` -> part class; each part class carries its ``kind`` and its ``Config`` (or is itself
    a settings class whose ``kind`` field is a ``Literal``: target encoders, decoders)."""

    version = 0  # bumped by every registration in any registry: the recipe schema is rebuilt

    def __init__(self, what: str):
        self.what = what
        self._parts: dict[str, T] = {}

    def register(self, part: T) -> T:
        kind = part.kind if isinstance(getattr(part, "kind", None), str) else kind_of(part)  # type: ignore[attr-defined]
        if kind in self._parts and self._parts[kind] is not part:
            if _same_definition(self._parts[kind], part):  # a module imported again (under its file name)
                return part
            raise ValueError(f"{self.what} {kind!r} is registered twice ({self._parts[kind]} and {part})")
        self._parts[kind] = part
        Registry.version += 1
        return part

    def __getitem__(self, kind: str) -> T:
        if kind not in self._parts:
            raise ValueError(f"unknown {self.what} {kind!r}; expected one of {', '.join(self.kinds())}")
        return self._parts[kind]

    def __contains__(self, kind: str) -> bool:
        return kind in self._parts

    def __iter__(self) -> Iterator[T]:
        return iter(self._parts.values())

    def kinds(self) -> list[str]:
        return sorted(self._parts)

    def configs(self) -> tuple[type, ...]:
        """The config class of every part, for a pydantic union discriminated on ``kind``."""
        return tuple(getattr(p, "Config", p) for p in self._parts.values())

    def by_kind(self) -> dict[str, type]:
        """``kind`` -> its config class."""
        return {k: getattr(p, "Config", p) for k, p in self._parts.items()}

    def module_of(self, kind: str) -> str:
        """The module that registered ``kind``."""
        return self[kind].__module__


def _same_definition(a, b) -> bool:
    return a.__qualname__ == b.__qualname__ and a.__module__ == b.__module__


def kind_of(config) -> str:
    """The ``kind`` a settings class declares (``kind: Literal["ema"]``)."""
    return get_args(config.model_fields["kind"].annotation)[0]


def import_parts(package: str, path) -> None:
    """Import every module of a parts package (its ``__name__`` and ``__path__``) so each registers."""
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
