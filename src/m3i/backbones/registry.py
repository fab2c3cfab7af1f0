"""The backbones' registry: their settings (``backbone:`` of a recipe), registration of a config
under a name, and building one by name, timm's models (``timm/<model>``) included. It sits above
:mod:`.base` (the contract) and :mod:`.timm` (the wrapper of timm's models)."""
from __future__ import annotations

import inspect
from typing import Any
from collections.abc import Callable

from pydantic import field_validator

from ..registry import Definer, RegistrationError, definer_of, did_you_mean, is_new
from ..schema import Strict
from .base import Backbone
from .timm import build_timm, timm_input_modes


class BackboneCfg(Strict):
    # a registered backbone (m3i's, or one a plugin registers), or any timm model as timm/<model>
    name: str = "vit_micro"
    img_size: int = 32
    # the token grid's stride in pixels; for ConvNeXt it picks the stem (final stride = 8·stem)
    patch_size: int | None = 4
    in_chans: int = 3
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    dims: list[int] | None = None
    depths: list[int] | None = None
    stem_stride: int | None = None
    drop_path_rate: float = 0.0
    # the patch embedding (a convolutional backbone's stem) is not trained (SIM, MoCo v3)
    frozen_patch_embed: bool = False
    grad_checkpointing: bool = False

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in _REGISTRY and not name.startswith(TIMM_PREFIX):
            raise ValueError(f"unknown backbone {name!r}{did_you_mean(name, _REGISTRY)}; expected one of "
                             f"{', '.join(backbone_names())}, or {TIMM_PREFIX}<model> for any timm model")
        return name

    def kwargs(self) -> dict[str, Any]:
        skip = {"name", "grad_checkpointing"}
        kw = {k: v for k, v in self.model_dump().items() if v is not None and k not in skip}
        if _stride_from_stem(self.name) and "patch_size" in kw:
            stride = kw.pop("patch_size")
            kw.setdefault("stem_stride", min(4, max(1, stride // 8)))
        return kw


_REGISTRY: dict[str, Callable[..., Backbone]] = {}
_CLASSES: dict[str, type[Backbone]] = {}
_DEFINERS: dict[str, Definer] = {}  # who registered each name, for messages and a run's plugins
TIMM_PREFIX = "timm/"


def register(name: str, **defaults):
    """Register a backbone config: ``register("vit_base", embed_dim=768, ...)(VisionTransformer)``.
    A name already registered (m3i's own included) is refused, as are names under ``timm/``."""

    def wrap(cls):
        def build(**kw):
            accepted = inspect.signature(cls).parameters
            unknown = [k for k in kw if k not in accepted]
            if unknown:
                raise ValueError(f"backbone.{unknown[0]}: not a setting of {name} ({cls.__name__})")
            return cls(**{**defaults, **kw})

        by = definer_of(cls, settings=tuple(sorted(defaults.items())))
        if name.startswith(TIMM_PREFIX):  # backbone.name=timm/<model> always means timm's model
            raise RegistrationError(f"backbone {name!r}, registered by {by}: names under {TIMM_PREFIX} are "
                                    f"timm's models; give it another name")
        if is_new("backbone", name, _DEFINERS.get(name), by):
            _REGISTRY[name], _CLASSES[name], _DEFINERS[name] = build, cls, by
        return cls

    return wrap


def _stride_from_stem(name: str) -> bool:
    """Whether the backbone ``name`` sets its final stride by its stem (ConvNeXt's ``stem_stride``,
    under any registered name) rather than by a ``patch_size``."""
    params = inspect.signature(_CLASSES[name]).parameters if name in _CLASSES else {}
    return "stem_stride" in params and "patch_size" not in params


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def module_of(name: str) -> str | None:
    """The module of the class that builds the backbone ``name`` (its layout)."""
    if name.startswith(TIMM_PREFIX):
        return build_timm.__module__
    return _CLASSES[name].__module__ if name in _CLASSES else None


def registered_by(name: str) -> str | None:
    """The module that registered the backbone ``name`` (a plugin may register m3i's own class)."""
    return _DEFINERS[name].module if name in _DEFINERS else module_of(name)


def input_modes(name: str) -> tuple[str, ...]:
    """The input modes of masked views that the backbone called ``name`` takes."""
    if name.startswith(TIMM_PREFIX):
        return timm_input_modes(name.removeprefix(TIMM_PREFIX))
    return _CLASSES[name].input_modes if name in _CLASSES else ("drop", "mix", "fill")


def build_backbone(name: str, **overrides) -> Backbone:
    if name.startswith(TIMM_PREFIX):
        return build_timm(name.removeprefix(TIMM_PREFIX), **overrides)
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}{did_you_mean(name, _REGISTRY)}; expected one of "
                         f"{', '.join(backbone_names())}")
    return _REGISTRY[name](**overrides)
