"""MaskFeat's target as a kind of target: the histogram of oriented gradients of each masked patch.

Copy this file to ``src/m3i/targets/hog.py``: the package imports it and the recipe key
``target: {kind: hog}`` works (with ``target_encoder: {kind: identity}``, a dense decoder with
``queries: masked`` and a Gaussian estimator), with no other change.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import TARGETS, DenseTarget, TargetCfg


class HOGCfg(TargetCfg):
    kind: Literal["hog"]
    view: int = Field(0, ge=0, le=1)
    bins: int = Field(9, ge=2)


def hog(images: torch.Tensor, patch: int, bins: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, bins): per patch, the gradient magnitudes of the gray image summed
    into unsigned orientation bins, then L2-normalised."""
    gray = images.float().mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0]], device=images.device).view(1, 1, 1, 3)
    gx = F.conv2d(F.pad(gray, (1, 1, 0, 0), mode="replicate"), kx)
    gy = F.conv2d(F.pad(gray, (0, 0, 1, 1), mode="replicate"), kx.transpose(2, 3))
    magnitude = torch.sqrt(gx ** 2 + gy ** 2)
    angle = torch.atan2(gy, gx) % math.pi                         # unsigned orientation in [0, π)
    index = (angle / math.pi * bins).long().clamp(max=bins - 1)
    votes = torch.zeros(images.shape[0], bins, *gray.shape[2:], device=images.device)
    votes.scatter_(1, index, magnitude)                           # (B, bins, H, W)
    cells = F.avg_pool2d(votes, patch) * patch * patch            # (B, bins, H/p, W/p)
    return F.normalize(cells.flatten(2).transpose(1, 2), dim=-1)  # (B, N, bins), row-major patches


@TARGETS.register
class HOG(DenseTarget):
    kind = "hog"
    Config = HOGCfg
    encoders = ("identity",)

    @classmethod
    def describe(cls, term) -> str:
        return "oriented-gradient histograms of the masked patches"

    def out_dim(self, cfg, backbone):
        return cfg.target.bins

    def dense_target(self, term, ctx, t, abs_pos):
        return hog(ctx.view(t)[0], ctx.patch_size, term.cfg.target.bins)
