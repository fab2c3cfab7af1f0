"""The identity target encoder: the pixels of each patch (MAE)."""
from __future__ import annotations

from typing import Literal

from torch import Tensor

from .base import TARGET_ENCODERS, TargetEncoderCfg


@TARGET_ENCODERS.register
class IdentityCfg(TargetEncoderCfg):
    """The pixels themselves (MAE)."""

    kind: Literal["identity"]
    patch_norm: bool = True  # normalise each patch's pixels

    def describe(self) -> str:
        return "identity"


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p·p·C), patches in row-major order, pixels as (py, px, c)."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)


def pixel_target(images: Tensor, patch: int, patch_norm: bool = True) -> Tensor:
    """Identity target encoder: the pixels of every patch, optionally normalised per patch (MAE)."""
    z = patchify(images.float(), patch)
    if patch_norm:
        mean, var = z.mean(-1, keepdim=True), z.var(-1, keepdim=True)
        z = (z - mean) / (var + 1e-6).sqrt()
    return z
