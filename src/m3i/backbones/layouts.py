"""Weights in timm's layout (a released ViT or ConvNeXt, or an m3i export) -> a backbone's own names.

Every backbone with a timm layout says how its tensors are named there (``timm_state_dict``: the
same tensors under timm's names, some reshaped). The way back is read off that: a timm name maps
to the backbone tensor that shares its storage, and takes that tensor's shape. The patch position
table is resampled to the backbone's grid when the file was trained at another resolution
(a DINOv2 ViT at 518 px continued at 224). The file's classifier, which a pre-training objective
has no use for, is left out and named.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .vit import resample_pos_embed

# the classification heads of timm's models (ViT, ConvNeXt, ResNet, ...): a released model's, not the backbone's
CLASSIFIER_PREFIXES = ("head.", "fc.", "classifier.", "head_dist.")


def timm_names(backbone) -> dict[str, str]:
    """timm name -> the backbone's own name of the same tensor."""
    if not hasattr(backbone, "timm_state_dict"):
        raise ValueError(f"{type(backbone).__name__} has no timm layout; only vit_*, convnext_* and timm/<model> "
                         f"backbones load weights in timm's layout")
    own = {t.data_ptr(): k for k, t in backbone.state_dict(keep_vars=True).items() if t.numel()}
    return {k: own[t.data_ptr()] for k, t in backbone.timm_state_dict().items() if t.numel() and t.data_ptr() in own}


def _positions(table: Tensor, want: Tensor, grid: tuple[int, int], where: str) -> Tensor:
    """A position table (1, P + N', D) resampled to ``want``'s (1, P + N, D), N = gh·gw (P: the
    class and register tokens' rows, kept)."""
    prefix = want.shape[1] - grid[0] * grid[1]
    n = table.shape[1] - prefix
    side = math.isqrt(max(n, 0))
    if table.ndim != 3 or table.shape[-1] != want.shape[-1] or prefix < 0 or side * side != n:
        return table  # not a square grid of the same width: the shape check names it
    patches = resample_pos_embed(table[:, prefix:], (side, side), grid)
    print(f"{where}: position table resampled from a {side}×{side} to a {grid[0]}×{grid[1]} patch grid")
    return torch.cat([table[:, :prefix], patches], 1)


def from_timm(backbone, weights: dict[str, Tensor], where: str) -> tuple[dict[str, Tensor], list[str]]:
    """``weights`` in timm's layout -> (the backbone's own state dict entries, the classifier
    tensors left out). Tensors the backbone does not have keep their timm name, so that the
    loader names them as unknown."""
    names, own = timm_names(backbone), backbone.state_dict()
    out, dropped = {}, []
    for k, v in weights.items():
        if k not in names:
            if k.startswith(CLASSIFIER_PREFIXES):
                dropped.append(k)
            else:
                out[k] = v
            continue
        name = names[k]
        want = own[name]
        if name.endswith("pos_embed") and v.shape != want.shape:
            v = _positions(v, want, backbone.grid_size, where)
        elif v.shape != want.shape and v.numel() == want.numel() and v.squeeze().shape == want.squeeze().shape:
            v = v.reshape(want.shape)  # a 1×1 conv kernel stored for a linear layer, or back
        out[name] = v
    return out, dropped
