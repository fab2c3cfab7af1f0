"""Each compared recipe's structural knob: the one setting beside learning rate and weight decay
that ``tune.py`` searches for it, the same number of trials for every recipe.

A knob is what most shapes the recipe's own objective: a contrastive recipe's temperature, a masked
one's mask ratio, a term's weight in a recipe of several terms, or, where the objective has none
of these, the crop scale of its views. A term is named, not numbered (``term:category.weight``), so
that a variant with its terms in another order gets the same knob. A knob may set several settings
to one value (the crop scale of both views).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from m3i.config import Recipe


@dataclass(frozen=True)
class Knob:
    name: str  # in words, for the reports
    paths: tuple[str, ...]  # settings set to the knob's value; ``term:NAME.rest`` addresses a term by name
    low: float
    high: float
    log: bool = False


def _crop(views: int) -> tuple[str, ...]:
    return tuple(f"views.augment.{v}.crop_scale.0" for v in range(views))


KNOBS: dict[str, Knob] = {
    "supervised": Knob("crop scale, lower bound", _crop(1), 0.08, 0.8),
    "clip": Knob("initial temperature", ("term:caption.estimator.temperature",), 0.02, 0.2, log=True),
    "siglip": Knob("initial temperature", ("term:caption.estimator.temperature",), 0.03, 0.3, log=True),
    "coca": Knob("captioning weight", ("term:captioning.weight",), 0.5, 4.0, log=True),
    "simclr": Knob("temperature", ("term:view.estimator.temperature",), 0.05, 0.5, log=True),
    "mocov3": Knob("temperature", ("term:view.estimator.temperature",), 0.05, 0.5, log=True),
    "byol": Knob("crop scale, lower bound", _crop(2), 0.08, 0.8),
    "mae": Knob("mask ratio", ("views.mask.ratio",), 0.4, 0.9),
    "data2vec": Knob("mask ratio", ("views.mask.ratio",), 0.3, 0.9),
    "sim": Knob("mask ratio", ("views.mask.ratio",), 0.3, 0.8),
    "dino": Knob("teacher temperature", ("term:dino.target_encoder.temperature",), 0.02, 0.08, log=True),
    "dinov2": Knob("KoLeo weight", ("term:koleo.weight",), 0.01, 0.3, log=True),
    # the m3i family: the weight of the label term, the choice its earlier ablations turned on
    "m3i": Knob("category weight", ("term:category.weight",), 0.5, 4.0, log=True),
    "m3i-one": Knob("category weight", ("term:category.weight",), 0.5, 4.0, log=True),
    "m3i-distill": Knob("category weight", ("term:category.weight",), 0.5, 4.0, log=True),
}


def setting_path(recipe: Recipe, path: str) -> str:
    """``path`` with a ``term:NAME`` head resolved to the term's index in ``recipe``."""
    if not path.startswith("term:"):
        return path
    name, _, rest = path[len("term:"):].partition(".")
    names = [t.name for t in recipe.terms]
    if name not in names:
        raise ValueError(f"knob setting {path!r}: recipe {recipe.name!r} has no term {name!r} (terms: {names})")
    return f"terms.{names.index(name)}.{rest}"


def current(recipe: Recipe, path: str) -> Any:
    """The value ``recipe`` has at the dotted ``path`` (resolved by :func:`setting_path`)."""
    node: Any = recipe
    for part in setting_path(recipe, path).split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def knob_settings(recipe: Recipe, knob: Knob, value: float) -> dict[str, float]:
    """The settings (dotted key -> value) that give ``recipe`` the knob at ``value``."""
    return {setting_path(recipe, p): float(f"{value:.4g}") for p in knob.paths}


def knob_default(recipe: Recipe, knob: Knob) -> float:
    """The knob's value in the recipe as shipped (its first setting's)."""
    return float(current(recipe, knob.paths[0]))
