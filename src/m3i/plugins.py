"""Parts from the user's own code: a plugin is a module that registers parts with the decorators
m3i's own modules use (``@TARGETS.register``, ``@ESTIMATORS.register``,
``@TARGET_ENCODERS.register``, ``@DECODERS.register``, ``backbones.register(name)``,
``data.register_source(kind, form)``). It is imported, before a recipe is validated, when named

- on the command line: ``m3i --plugin my_module pretrain ...`` (repeatable);
- in the environment: ``M3I_PLUGINS=my_module,other_module``;
- by an installed package's entry point in the group ``m3i.parts``
  (``[project.entry-points."m3i.parts"] my_parts = "my_package.parts"``);
- in a recipe: ``plugins: [my_module]``. A run's ``config.yaml`` lists every plugin imported,
  however it was named, and every module outside m3i whose parts it uses, so ``--resume``,
  ``eval`` and ``export`` import them again (or say which one is missing).

A module that cannot be imported is an error of one line naming it, where it was asked for and
why: the plugin is not installed, a module it imports is not, or its own code raised (the
exception's type, message and line). A part registered under a name already taken is refused
the same way (:class:`m3i.registry.RegistrationError`): a plugin never silently replaces a part.
"""
from __future__ import annotations

import importlib
import os
import traceback
from importlib.metadata import entry_points

from .registry import RegistrationError
from . import PACKAGE_DIR
from .schema import ConfigError

ENV = "M3I_PLUGINS"
GROUP = "m3i.parts"

_loaded: dict[str, str] = {}  # module -> where it was asked for
_configured = False


def load(module: str, where: str = "--plugin") -> None:
    """Import ``module`` (its parts register themselves); ``where``: what named it, for the error."""
    if module in _loaded:
        return
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001  (any failure of the user's module is one line, not a traceback)
        raise ConfigError(f"{where}: {_failure(module, e)}") from None
    _loaded[module] = where


def _failure(module: str, e: Exception) -> str:
    """Why ``module`` could not be imported, in one line."""
    if isinstance(e, ModuleNotFoundError) and e.name and (module == e.name or module.startswith(e.name + ".")):
        return f"cannot import plugin {module!r} ({e}); install it or put it on PYTHONPATH"
    if isinstance(e, RegistrationError):
        return f"plugin {module!r}: {e}"
    message = e.msg if isinstance(e, SyntaxError) else e  # the file and line follow, in full
    failed = f"plugin {module!r} failed on import: {type(e).__name__}: {message}{_line(e)}"
    if isinstance(e, ModuleNotFoundError) and e.name:  # a module the plugin imports
        return f"{failed}; the plugin needs {e.name!r}: install it or put it on PYTHONPATH"
    return failed


def _line(e: Exception) -> str:
    """Where the plugin's code raised ``e``: ``, at FILE:LINE``, the innermost frame outside m3i and
    the import machinery (or the line a syntax error is on)."""
    if isinstance(e, SyntaxError) and e.filename:
        return f", at {e.filename}:{e.lineno}"
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(("<frozen", PACKAGE_DIR))]
    return f", at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def load_named(modules, where: str) -> None:
    """Import each module of a recipe's ``plugins`` list (``where``: the file, for the error)."""
    if modules is None:
        return
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise ConfigError(f"{where}: expected a list of module names, got {modules!r}")
    for m in modules:
        load(m, where)


def load_configured() -> None:
    """Import, once, the modules named by ``M3I_PLUGINS`` and the ``m3i.parts`` entry points."""
    global _configured
    if _configured:
        return
    for m in filter(None, (p.strip() for p in os.environ.get(ENV, "").split(","))):
        load(m, ENV)
    for ep in entry_points(group=GROUP):
        load(ep.value.split(":")[0], f"entry point {ep.name!r} ({GROUP})")
    _configured = True  # after a failure, the next recipe read reports it again


def loaded() -> list[str]:
    """The plugin modules imported so far."""
    return list(_loaded)
