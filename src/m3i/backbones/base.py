"""The one backbone interface every encoder f_θ answers to."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import torch
from pydantic import field_validator
from torch import Tensor, nn

from .. import debug
from ..registry import Definer, RegistrationError, definer_of, did_you_mean, is_new
from ..schema import Strict


@dataclass
class Features:
    """What a backbone returns.

    pooled: (B, D) image representation.
    tokens: (B, K, D) final-norm tokens at the visible positions (ascending), all N if none hidden.
    layers: outputs of the last ``return_layers`` blocks at the same positions, before the final norm.
    """

    pooled: Tensor
    tokens: Tensor
    layers: list[Tensor] = field(default_factory=list)


class Backbone(nn.Module):
    """Base class: subclasses set the attributes below and implement ``forward_features``."""

    embed_dim: int
    grid_size: tuple[int, int]
    patch_size: int
    in_chans: int
    img_size: int
    supports_drop: bool = True  # can compute only the visible tokens (input mode "drop")
    # the input modes of masked views (m3i.config.ViewsCfg.input_mode) the backbone takes
    input_modes: tuple[str, ...] = ("drop", "mix", "fill")
    frozen_patch_embed: bool = False  # the patch embedding (stem) is not trained

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward_features(
        self, x: Tensor, visible: Tensor | None = None, mode: str = "drop", return_layers: int = 0,
        count: int | None = None,
    ) -> Features:
        """``count``: the number of True per row of ``visible`` when the caller knows it (the
        backbone then reads nothing back to the host: `visible_indices`)."""
        raise NotImplementedError

    def forward(self, x: Tensor, visible: Tensor | None = None, mode: str = "drop") -> Tensor:
        return self.forward_features(x, visible, mode).pooled

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError

    def use_channels_last(self) -> None:
        """Keep images and convolution weights in the channels-last memory format (what a GPU's
        convolution kernels run fastest on); token backbones have nothing to change."""

    def stem_module(self) -> nn.Module:
        """The patch embedding: the layers that turn pixels into the first features."""
        raise NotImplementedError

    def freeze_patch_embed(self, frozen: bool = True) -> None:
        """Keep the patch embedding at its initial (or loaded) weights (MoCo v3, SIM), or train it
        again (``frozen=False``). Its parameters get ``requires_grad=False``, which ``deepcopy``,
        ``.to()`` and ``load_state_dict`` keep; the optimiser groups of training and fine-tuning
        leave such parameters out (their layer ids are unchanged). A batch norm in the stem still
        normalises with batch statistics in training and tracks its running averages."""
        self.frozen_patch_embed = bool(frozen)
        self.stem_module().requires_grad_(not frozen)

    @property
    def num_layers(self) -> int:
        """Depth levels for layer-wise learning-rate decay: the stem (0), one per block, and
        everything after the last block (``num_layers``, the level a classification head joins)."""
        raise NotImplementedError

    def layer_id(self, name: str) -> int:
        """The depth level, in ``[0, num_layers]``, of the parameter called ``name``."""
        raise NotImplementedError


def reads_values(count: int | None) -> bool:
    """Whether a backbone checks ``visible`` by its values: when the caller gave no ``count`` (the
    values are read anyway) or in debug mode."""
    return count is None or debug.enabled()


def visible_indices(visible: Tensor, count: int | None = None) -> Tensor:
    """(B, N) bool with K True per row -> (B, K) long indices in ascending order.

    ``count``: K when the caller knows it (from the mask's configuration): nothing is read back
    to the host (the rows are checked only in debug mode, :mod:`m3i.debug`). Without it K is
    read from ``visible``, which waits for the device."""
    if reads_values(count):
        counts = visible.sum(1)
        if visible.shape[0] and not bool((counts == (counts[0] if count is None else count)).all()):
            want = "the same number of patches" if count is None else f"{count} patches"
            raise ValueError(f"every row of `visible` must show {want}, got {counts.tolist()}")
        if count is None:
            count = int(counts[0]) if visible.shape[0] else 0
    # a stable sort puts the True positions first in their original order
    order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)
    return order[:, :count]


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
        return __name__.rsplit(".", 1)[0] + ".timm"
    return _CLASSES[name].__module__ if name in _CLASSES else None


def registered_by(name: str) -> str | None:
    """The module that registered the backbone ``name`` (a plugin may register m3i's own class)."""
    return _DEFINERS[name].module if name in _DEFINERS else module_of(name)


def input_modes(name: str) -> tuple[str, ...]:
    """The input modes of masked views that the backbone called ``name`` takes."""
    if name.startswith(TIMM_PREFIX):
        from .timm import timm_input_modes

        return timm_input_modes(name.removeprefix(TIMM_PREFIX))
    return _CLASSES[name].input_modes if name in _CLASSES else ("drop", "mix", "fill")


def build_backbone(name: str, **overrides) -> Backbone:
    if name.startswith(TIMM_PREFIX):
        from .timm import build_timm

        return build_timm(name.removeprefix(TIMM_PREFIX), **overrides)
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}{did_you_mean(name, _REGISTRY)}; expected one of "
                         f"{', '.join(backbone_names())}")
    return _REGISTRY[name](**overrides)
