"""The one backbone interface every encoder f_θ answers to."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn


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

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward_features(
        self, x: Tensor, visible: Tensor | None = None, mode: str = "drop", return_layers: int = 0
    ) -> Features:
        raise NotImplementedError

    def forward(self, x: Tensor, visible: Tensor | None = None, mode: str = "drop") -> Tensor:
        return self.forward_features(x, visible, mode).pooled

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        """Depth levels for layer-wise learning-rate decay: the stem (0), one per block, and
        everything after the last block (``num_layers``, the level a classification head joins)."""
        raise NotImplementedError

    def layer_id(self, name: str) -> int:
        """The depth level, in ``[0, num_layers]``, of the parameter called ``name``."""
        raise NotImplementedError


def visible_indices(visible: Tensor) -> Tensor:
    """(B, N) bool with K True per row -> (B, K) long indices in ascending order."""
    counts = visible.sum(1)
    if visible.shape[0] and not bool((counts == counts[0]).all()):
        raise ValueError(f"every row of `visible` must show the same number of patches, got {counts.tolist()}")
    k = int(counts[0]) if visible.shape[0] else 0
    # a stable sort puts the True positions first in their original order
    order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)
    return order[:, :k]


_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register(name: str, **defaults):
    """Register a backbone config: ``register("vit_base", embed_dim=768, ...)(VisionTransformer)``."""

    def wrap(cls):
        def build(**kw):
            accepted = inspect.signature(cls).parameters
            unknown = [k for k in kw if k not in accepted]
            if unknown:
                raise ValueError(f"backbone.{unknown[0]}: not a setting of {name} ({cls.__name__})")
            return cls(**{**defaults, **kw})

        _REGISTRY[name] = build
        return cls

    return wrap


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(name: str, **overrides) -> Backbone:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(backbone_names())}")
    return _REGISTRY[name](**overrides)
