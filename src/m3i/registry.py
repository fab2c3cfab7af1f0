"""Registries of parts: a name (the ``kind`` a recipe writes) mapped to the class that implements it.

A part registers itself where it is defined (``@ESTIMATORS.register``), and every module of a
parts package is imported when the package is (:func:`import_parts`), so a new part is one new
file: nothing else lists it.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar
from collections.abc import Iterator

T = TypeVar("T")


class Registry(Generic[T]):
    """``kind`` -> part class; each part class carries its ``kind`` and its ``Config``."""

    def __init__(self, what: str):
        self.what = what
        self._parts: dict[str, T] = {}

    def register(self, part: T) -> T:
        kind = part.kind  # type: ignore[attr-defined]
        if kind in self._parts and self._parts[kind] is not part:
            raise ValueError(f"{self.what} {kind!r} is registered twice ({self._parts[kind]} and {part})")
        self._parts[kind] = part
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
        return tuple(p.Config for p in self._parts.values())  # type: ignore[attr-defined]


def import_parts(package: str, path) -> None:
    """Import every module of a parts package (its ``__name__`` and ``__path__``) so each registers."""
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
