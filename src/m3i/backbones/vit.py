"""Vision Transformer backbone f_θ.

Parameter names and shapes follow the timm ``VisionTransformer`` layout (class token, no register
tokens, no layer scale, ``num_classes=0``), so ``timm_state_dict()`` loads into the matching timm
model with ``strict=True``.

Three ways to run a partially visible image (``visible``: (B, N) bool, True = seen):

- ``drop``: only the visible patch tokens (plus the class token) enter the blocks.
- ``mix``:  samples b and b + B/2 share one canvas of N tokens, attention restricted to tokens of
  the same image, so every sample's output equals its ``drop`` output; the ViT therefore runs it
  as ``drop`` (separate sequences, no attention mask: the fused attention kernels apply, and no
  attention is computed between the two images only to be masked away).
- ``fill``: hidden patches are replaced by a learned mask token after the stem; every position
  is computed and the output is read at the visible positions.

An image of another size (a multiple of the patch size) gets the position table resampled
bicubically to its patch grid (`resample_pos_embed`), as dense evaluation on larger canvases needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import Block
from .base import Backbone, Features, reads_values, visible_indices
from .registry import register

_MODES = ("drop", "mix", "fill")


def sincos_pos_embed_2d(grid_size: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sine-cosine table (gh * gw, dim), rows in row-major patch order.

    The first half of the channels encodes the column (x), the second half the row (y); each half
    is [sin(pos * ω_i), cos(pos * ω_i)] with ω_i = 10000^(-i / (dim / 4)).
    """
    if dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos position table, got {dim}")
    gh, gw = grid_size
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(xs), encode(ys)], dim=1).float()


def resample_pos_embed(table: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Patch position table (1, gh * gw, D) -> (1, nh * nw, D), resampled bicubically over the grid.

    The table is treated as a D-channel image of the old grid, so a position keeps the embedding
    of the same relative place in the image; the identity when the grids agree.
    """
    if tuple(old_grid) == tuple(new_grid):
        return table
    gh, gw = old_grid
    d = table.shape[-1]
    grid = table.reshape(1, gh, gw, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False,
                         antialias=new_grid[0] < gh or new_grid[1] < gw)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, d).to(table.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> D-dim tokens (B, N, D), row-major order."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@torch.no_grad()
def _trunc_normal_(w: Tensor, std: float) -> Tensor:
    """Fill ``w`` with normal(0, std) cut at ±2σ by redrawing the outliers (much faster than erfinv)."""
    w.normal_(0.0, std)
    if w.is_meta:  # shapes only (a recipe's size, counted without memory)
        return w
    flat = w.view(-1)
    idx = (flat.abs() > 2 * std).nonzero().squeeze(1)
    while idx.numel():
        draw = flat.new_empty(idx.numel()).normal_(0.0, std)
        ok = draw.abs() <= 2 * std
        flat[idx[ok]] = draw[ok]
        idx = idx[~ok]
    return w


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, D), idx (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@register("vit_nano", embed_dim=128, depth=4, num_heads=4)
@register("vit_micro", embed_dim=192, depth=6, num_heads=3)
@register("vit_tiny", embed_dim=192, depth=12, num_heads=3)
@register("vit_small", embed_dim=384, depth=12, num_heads=6)
@register("vit_base", embed_dim=768, depth=12, num_heads=12)
@register("vit_large", embed_dim=1024, depth=24, num_heads=16)
@register("vit_huge", embed_dim=1280, depth=32, num_heads=16, patch_size=14)
# ViT-g/14 (Zhai et al., "Scaling Vision Transformers"; timm's vit_giant_patch14_224): 1.01 B
# parameters, its MLP 48/11 of the width (6,144), a plain GELU MLP as every m3i ViT's
@register("vit_giant", embed_dim=1408, depth=40, num_heads=16, patch_size=14, mlp_ratio=48 / 11)
class VisionTransformer(Backbone):
    """ViT with a class token; pooled output is the final-normed class token.

    ``frozen_patch_embed``: the patch embedding is not trained (`freeze_patch_embed`)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        learn_pos_embed: bool = False,
        fill: bool = False,
        frozen_patch_embed: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("img_size", img_size),
            ("patch_size", patch_size),
            ("in_chans", in_chans),
            ("embed_dim", embed_dim),
            ("depth", depth),
            ("num_heads", num_heads),
        ):
            _check_int(name, value)
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if embed_dim % 4:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by 4 for the 2-D sin-cos position table")
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0 and int(embed_dim * mlp_ratio) >= 1):
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        if not (isinstance(drop_path_rate, (int, float)) and 0.0 <= drop_path_rate < 1.0):
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")

        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.grad_checkpointing = False

        # registration order mirrors timm's state-dict order
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, 1 + self.num_patches, embed_dim), requires_grad=bool(learn_pos_embed)
        )
        if fill:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.register_parameter("mask_token", None)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also when built on the meta device
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.reset_parameters()
        self.freeze_patch_embed(frozen_patch_embed)

    # ------------------------------------------------------------------ init / export
    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.pos_embed.zero_()
        self.pos_embed[0, 1:].copy_(sincos_pos_embed_2d(self.grid_size, self.embed_dim))
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # treat the patch stem as a linear layer
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                _trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def timm_state_dict(self) -> dict[str, Tensor]:
        """The state dict in timm's layout (everything but the SimMIM ``mask_token``)."""
        sd = self.state_dict()
        sd.pop("mask_token", None)
        return sd

    def no_weight_decay(self) -> set[str]:
        """Parameter names usually excluded from weight decay."""
        return {"cls_token", "pos_embed", "mask_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def stem_module(self) -> nn.Module:
        return self.patch_embed

    @property
    def num_layers(self) -> int:
        return self.depth + 1

    def layer_id(self, name: str) -> int:
        """BEiT's levels: tokens and patch stem 0, ``blocks.i`` i + 1, the final norm ``depth + 1``."""
        if name.startswith(("patch_embed.", "cls_token", "pos_embed", "mask_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers

    # ------------------------------------------------------------------ forward
    def _run_blocks(self, x: Tensor, attn_mask: Tensor | None, return_layers: int) -> tuple[Tensor, list[Tensor]]:
        layers: list[Tensor] = []
        first_kept = len(self.blocks) - return_layers
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            if use_ckpt:
                x = checkpoint(blk, x, attn_mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask)
            if i >= first_kept:
                layers.append(x)
        return x, layers

    def _check_inputs(self, x: Tensor, visible: Tensor | None, mode: str, return_layers: int) -> tuple[int, int]:
        """Validate the inputs; returns the patch grid (gh, gw) of ``x``."""
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if isinstance(return_layers, bool) or not isinstance(return_layers, int) or not 0 <= return_layers <= self.depth:
            raise ValueError(f"return_layers must be an integer in [0, depth={self.depth}], got {return_layers!r}")
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[2] % p or x.shape[3] % p or min(x.shape[2:]) < p:
            raise ValueError(f"x must have shape (B, {self.in_chans}, H, W) with H and W multiples of the patch size "
                             f"{p} (trained at {self.img_size}), got {tuple(x.shape)}")
        grid = (x.shape[2] // p, x.shape[3] // p)
        if visible is not None:
            n = grid[0] * grid[1]
            if visible.dtype != torch.bool:
                raise ValueError(f"visible must be a bool tensor, got dtype {visible.dtype}")
            if tuple(visible.shape) != (x.shape[0], n):
                raise ValueError(
                    f"visible must have shape (B, N) = ({x.shape[0]}, {n}), got {tuple(visible.shape)}"
                )
        if mode == "fill" and visible is not None and self.mask_token is None:
            raise ValueError("mode='fill' needs a mask_token: build the backbone with fill=True")
        return grid

    def forward_features(
        self, x: Tensor, visible: Tensor | None = None, mode: str = "drop", return_layers: int = 0,
        count: int | None = None,
    ) -> Features:
        """See the module docstring; ``visible=None`` runs every patch whatever the mode;
        ``count``: the visible patches per row when the caller knows it (nothing read back)."""
        grid = self._check_inputs(x, visible, mode, return_layers)
        b = x.shape[0]
        patches = self.patch_embed(x)  # (B, N, D)
        pos = self.pos_embed.to(patches.dtype)
        pos = torch.cat([pos[:, :1], resample_pos_embed(pos[:, 1:], self.grid_size, grid)], dim=1)
        cls = (self.cls_token.to(patches.dtype) + pos[:, :1]).expand(b, -1, -1)

        if visible is None:
            seq = torch.cat([cls, patches + pos[:, 1:]], dim=1)
            return self._finish(seq, None, return_layers)

        if mode == "mix":
            self._check_mix(visible, count)
            mode = "drop"  # equal per image, so the two images of a canvas run as separate sequences
        idx = visible_indices(visible, count)
        if mode == "drop":
            seq = torch.cat([cls, _gather(patches + pos[:, 1:], idx)], dim=1)
            return self._finish(seq, None, return_layers)

        keep = visible.unsqueeze(-1)
        filled = torch.where(keep, patches, self.mask_token.to(patches.dtype).expand_as(patches))
        seq = torch.cat([cls, filled + pos[:, 1:]], dim=1)
        return self._finish(seq, idx, return_layers)

    def _finish(self, seq: Tensor, idx: Tensor | None, return_layers: int) -> Features:
        """Blocks + final norm on [cls, tokens]; read the patch tokens at ``idx`` (all if None)."""
        seq, layers = self._run_blocks(seq, None, return_layers)
        out = self.norm(seq)
        pooled, tokens = out[:, 0], out[:, 1:]
        layers = [h[:, 1:] for h in layers]
        filled = None
        if idx is not None:  # fill: every position computed
            filled, tokens = tokens, _gather(tokens, idx)
            layers = [_gather(h, idx) for h in layers]
        return Features(pooled=pooled, tokens=tokens, layers=layers, filled=filled)

    @staticmethod
    def _check_mix(visible: Tensor, count: int | None) -> None:
        """The pairing of the mixed input: an even batch, and disjoint visible sets for samples b and
        b + B/2 (checked when the mask's values are read: `reads_values`)."""
        b = visible.shape[0]
        if b % 2:
            raise ValueError(f"mode='mix' needs an even batch size, got B={b}")
        if reads_values(count) and bool((visible[: b // 2] & visible[b // 2:]).any()):
            raise ValueError("mode='mix' needs disjoint visible sets for samples b and b + B/2")
