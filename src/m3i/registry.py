"""Registries of parts: a name (the ``kind`` a recipe writes) mapped to the class that implements it.

A part registers itself where it is defined (``@ESTIMATORS.register``), in m3i or in a user's own
module (a plugin, :mod:`m3i.plugins`); every module of a parts package is imported when the
package is (:func:`import_parts`), so a new part is one new file: nothing else lists it. The
recipe schema is built from the registries when a recipe is loaded, so a kind registered by a
plugin validates like a built-in one.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar, get_args

T = TypeVar("T")


class RegistrationError(ValueError):
    """A part that cannot be registered: its name is taken (registering it again would silently
    replace a part, m3i's own or a plugin's), reserved, or its settings declare another kind."""


@dataclass(frozen=True)
class Definer:
    """Who registered a part: the module whose code registered it, and what it registered."""

    module: str
    part: str  # the class or function registered
    settings: tuple = ()  # what else tells two registrations apart (a backbone's defaults)

    def __str__(self) -> str:
        return f"{self.module} ({self.part})"


def definer_of(part, depth: int = 2, settings: tuple = ()) -> Definer:
    """The :class:`Definer` of ``part``, registered by the code ``depth`` frames above the caller
    of this function (the module that called the registering function, not m3i's registry)."""
    module = sys._getframe(depth).f_globals.get("__name__", "?")
    return Definer(module, getattr(part, "__qualname__", repr(part)), settings)


def is_new(what: str, name: str, held: Definer | None, new: Definer) -> bool:
    """Whether ``name`` is still free in the registry of ``what``. The same definition again (its
    module imported once more) is no new registration: False. Another one raises
    :class:`RegistrationError`, naming both."""
    if held is None:
        return True
    if held == new:
        return False
    raise RegistrationError(f"{what} {name!r} is already registered by {held}; {new} registers it again: "
                            f"give it another name")


class Registry(Generic[T]):
    """``kind`` -> part class; each part class carries its ``kind`` and its ``Config`` (or is itself
    a settings class whose ``kind`` field is a ``Literal``: target encoders, decoders)."""

    version = 0  # bumped by every registration in any registry: the recipe schema is rebuilt

    def __init__(self, what: str):
        self.what = what
        self._parts: dict[str, T] = {}
        self._definers: dict[str, Definer] = {}

    def register(self, part: T) -> T:
        kind, by = _declared_kind(self.what, part), definer_of(part)
        if self._parts.get(kind) is part:
            return part
        if is_new(self.what, kind, self._definers.get(kind), by):
            self._parts[kind] = part
            self._definers[kind] = by
            Registry.version += 1
        return part

    def __getitem__(self, kind: str) -> T:
        if kind not in self._parts:
            raise ValueError(f"unknown {self.what} {kind!r}{did_you_mean(kind, self._parts)}; "
                             f"expected one of {', '.join(self.kinds())}")
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
        """The module that registered ``kind`` (a plugin that registers one of m3i's classes under a
        new kind is that kind's module)."""
        _ = self[kind]  # an unknown kind: the error that lists the kinds
        return self._definers[kind].module


def _declared_kind(what: str, part) -> str:
    """The ``kind`` of a part: its own ``kind`` and its settings' ``kind: Literal[...]``, which the
    recipe schema picks the settings by, must be one name."""
    own = part.kind if isinstance(getattr(part, "kind", None), str) else None
    config = getattr(part, "Config", part)
    try:
        declared = kind_of(config)
    except (AttributeError, IndexError, KeyError):
        declared = None
    if not isinstance(declared, str):
        raise RegistrationError(f"{what} {own or part!r}: its settings class {config.__qualname__} must declare "
                                f"its kind as `kind: Literal[{own or 'NAME'!r}]`")
    if own is not None and own != declared:
        raise RegistrationError(f"{what} {own!r} ({part.__qualname__}): its settings class {config.__qualname__} "
                                f"declares kind {declared!r}; the two must be the same")
    return declared


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a misspelt ``name``, else ``""``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def kind_of(config) -> str:
    """The ``kind`` a settings class declares (``kind: Literal["ema"]``)."""
    return get_args(config.model_fields["kind"].annotation)[0]


def import_parts(package: str, path) -> None:
    """Import every module of a parts package (its ``__name__`` and ``__path__``) so each registers."""
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
