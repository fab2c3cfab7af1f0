"""The pixel target: the visible patches predict the pixels of the masked ones (MAE)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..encoders.identity import pixel_target
from .base import TARGETS, DenseTarget, TargetCfg


class PixelsCfg(TargetCfg):
    kind: Literal["pixels"]
    view: int = Field(0, ge=0, le=1)


@TARGETS.register
class Pixels(DenseTarget):
    kind = "pixels"
    Config = PixelsCfg
    encoders = ("identity",)

    @classmethod
    def describe(cls, term) -> str:
        return "pixels of the masked patches" + (" (per-patch normalised)" if term.target_encoder.patch_norm else "")

    def out_dim(self, cfg, backbone):
        return backbone.patch_size ** 2 * backbone.in_chans

    def dense_target(self, term, ctx, t, abs_pos):
        return pixel_target(ctx.view(t)[0], ctx.patch_size, term.cfg.target_encoder.patch_norm)
