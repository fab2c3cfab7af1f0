"""Parts from the user's own code: a plugin is a module that registers parts with the decorators
m3i's own modules use (``@TARGETS.register``, ``@ESTIMATORS.register``,
``@TARGET_ENCODERS.register``, ``@DECODERS.register``, ``backbones.register(name)``,
``data.register_source(kind, form)``). It is imported, before a recipe is validated, when named

- on the command line: ``m3i --plugin my_module pretrain ...`` (repeatable);
- in the environment: ``M3I_PLUGINS=my_module,other_module``;
- by an installed package's entry point in the group ``m3i.parts``
  (``[project.entry-points."m3i.parts"] my_parts = "my_package.parts"``);
- in a recipe: ``plugins: [my_module]``. A run's ``config.yaml`` lists every module outside m3i
  whose parts it uses, so ``--resume``, ``eval`` and ``export`` import them again.

A module that cannot be imported is an error of one line naming it and where it was asked for.
"""
from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

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
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import plugin {module!r} ({e}); install it or put it on "
                         f"PYTHONPATH") from None
    _loaded[module] = where


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
    _configured = True
    for m in filter(None, (p.strip() for p in os.environ.get(ENV, "").split(","))):
        load(m, ENV)
    for ep in entry_points(group=GROUP):
        load(ep.value.split(":")[0], f"entry point {ep.name!r} ({GROUP})")


def loaded() -> list[str]:
    """The plugin modules imported so far."""
    return list(_loaded)


def used_by(recipe) -> list[str]:
    """The modules outside m3i that registered a part ``recipe`` uses (its backbone, data formats,
    and each term's target, target encoder, decoder and estimator), with the plugins it names."""
    from .backbones.base import module_of as backbone_module
    from .config import PARTS
    from .data.spec import module_of_spec

    mods = list(recipe.plugins)
    found = [backbone_module(recipe.backbone.name)] + [module_of_spec(s.spec) for s in recipe.data.sources]
    for t in recipe.terms:
        found += [reg.module_of(getattr(t, field).kind) for field, reg in PARTS.items()]
    for m in found:
        if m and not (m == "m3i" or m.startswith("m3i.")) and m not in mods:
            mods.append(m)
    return mods
