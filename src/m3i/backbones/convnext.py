"""ConvNeXt f_θ: the convolutional backbone of M3I behind the common `Backbone` interface.

The network is hierarchical: a patchify stem (conv with kernel = stride = ``stem_stride``, then a
channels-first LayerNorm), four stages, and a LayerNorm + 2×2/2 conv downsampling in front of
stages 1–3. The final stride is therefore ``stem_stride · 8`` (32 for the standard stem).

Parameter names follow timm's ``ConvNeXt`` (``conv_mlp=False``, ``num_classes=0``)::

    stem.0.{weight,bias}                       patchify conv
    stem.1.{weight,bias}                       LayerNorm2d
    stages.{s}.downsample.0.{weight,bias}      LayerNorm2d        (s >= 1)
    stages.{s}.downsample.1.{weight,bias}      2×2 stride-2 conv  (s >= 1)
    stages.{s}.blocks.{b}.conv_dw.{weight,bias}
    stages.{s}.blocks.{b}.norm.{weight,bias}
    stages.{s}.blocks.{b}.mlp.fc1.{weight,bias}
    stages.{s}.blocks.{b}.mlp.fc2.{weight,bias}
    stages.{s}.blocks.{b}.gamma
    head.norm.{weight,bias}                    LayerNorm after global pooling

A ``mask_token`` (``fill=True``) is the only extra parameter; `timm_state_dict` leaves it out.

Masking. A convolution mixes neighbouring positions, so masked patches cannot be dropped:

* ``mode="mix"`` pastes two images into one canvas along the patch-aligned mask at the final
  stride (image b where ``visible[b]``, image b + B/2 elsewhere) and runs the network once per
  canvas; each image reads its tokens at its own visible positions.
* ``mode="fill"`` (SimMIM) replaces the stem-resolution positions under masked final-stride
  patches by the learned ``mask_token``.
* ``mode="drop"`` raises ``ValueError`` when some patches are hidden.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .base import Backbone, Features, reads_values, visible_indices
from .registry import register
from ..layers import DropPath, Mlp

_MODES = ("drop", "mix", "fill")
_STEM_STRIDES = (1, 2, 4)
_LN_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7×7 depthwise conv → LayerNorm → MLP → layer scale → drop-path residual."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, ls_init: float = 1e-6, drop_path: float = 0.0):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(mlp_ratio * dim))
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.mlp(self.norm(y)) * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtStage(nn.Module):
    """Optional downsampling (LayerNorm2d + 2×2 stride-2 conv) followed by a run of blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_paths: Sequence[float]):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=_LN_EPS), nn.Conv2d(in_dim, dim, kernel_size=2, stride=2)
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim, drop_path=dp) for dp in drop_paths))


def build_stages(stage: type[nn.Module], dims: Sequence[int], depths: Sequence[int],
                 drop_path_rate: float) -> nn.Sequential:
    """One ``stage(in_dim, dim, depth, downsample, drop_paths)`` per entry of ``dims``; every stage
    after the first downsamples, and drop-path rises linearly over all blocks to ``drop_path_rate``."""
    rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
    stages, start, prev = [], 0, dims[0]
    for s, (dim, depth) in enumerate(zip(dims, depths)):
        stages.append(stage(prev, dim, depth, downsample=s > 0, drop_paths=rates[start:start + depth]))
        start, prev = start + depth, dim
    return nn.Sequential(*stages)


class ConvNeXtHead(nn.Module):
    """The pre-logits head: a LayerNorm over the pooled feature (also used on the output tokens)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


class ConvNeXt(Backbone):
    """Hierarchical convolutional backbone (timm ``ConvNeXt`` state-dict layout).

    ``frozen_patch_embed``: the stem (its conv and LayerNorm) is not trained (`freeze_patch_embed`)."""

    supports_drop = False  # a convolution sees every position: use mix or fill
    input_modes = ("mix", "fill")

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (3, 3, 9, 3),
        drop_path_rate: float = 0.0,
        stem_stride: int = 4,
        fill: bool = False,
        mlp_ratio: float = 4.0,
        ls_init_value: float = 1e-6,
        timm_conv_mlp: bool = False,
        frozen_patch_embed: bool = False,
    ):
        super().__init__()
        dims, depths = tuple(int(d) for d in dims), tuple(int(d) for d in depths)
        if len(dims) != 4 or min(dims) < 1:
            raise ValueError(f"dims must be 4 positive channel counts, got {dims}")
        if len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"depths must be 4 positive block counts, got {depths}")
        if stem_stride not in _STEM_STRIDES:
            raise ValueError(f"stem_stride must be one of {_STEM_STRIDES}, got {stem_stride}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be positive, got {in_chans}")
        stride = int(stem_stride) * 8
        if img_size < stride or img_size % stride:
            raise ValueError(
                f"img_size={img_size} must be a positive multiple of the final stride {stride} "
                f"(stem_stride={stem_stride} × 8)"
            )

        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.dims, self.depths = dims, depths
        self.stem_stride = int(stem_stride)
        self.patch_size = stride
        self.grid_size = (img_size // stride, img_size // stride)
        self.embed_dim = dims[-1]
        self.timm_conv_mlp = bool(timm_conv_mlp)
        self.grad_checkpointing = False
        self.channels_last = False

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=stem_stride, stride=stem_stride),
            LayerNorm2d(dims[0], eps=_LN_EPS),
        )
        self.stages = build_stages(ConvNeXtStage, dims, depths, drop_path_rate)
        self.head = ConvNeXtHead(dims[-1])
        self.mask_token = nn.Parameter(torch.zeros(dims[0])) if fill else None

        self.apply(self._init_weights)
        for blk in self.modules():
            if isinstance(blk, ConvNeXtBlock):
                nn.init.constant_(blk.gamma, ls_init_value)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.freeze_patch_embed(frozen_patch_embed)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ interface

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def stem_module(self) -> nn.Module:
        return self.stem

    @property
    def num_layers(self) -> int:
        return sum(self.depths) + 1

    def layer_id(self, name: str) -> int:
        """Stem and mask token 0; the k-th block over all stages k + 1, a stage's downsampling with
        its first block (timm's grouping); the pooled-feature norm ``num_layers``."""
        if name.startswith(("stem.", "mask_token")):
            return 0
        if name.startswith("stages."):
            parts = name.split(".")
            stage = int(parts[1])
            block = int(parts[3]) if parts[2] == "blocks" else 0
            return sum(self.depths[:stage]) + block + 1
        return self.num_layers

    def forward_features(
        self, x: Tensor, visible: Tensor | None = None, mode: str = "drop", return_layers: int = 0,
        count: int | None = None,
    ) -> Features:
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(_MODES)}")
        last_depth = self.depths[-1]
        if not 0 <= return_layers <= last_depth:
            raise ValueError(
                f"return_layers must lie in [0, {last_depth}] (blocks in the final stage), got {return_layers}"
            )
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x must be (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} must be a multiple of the final stride {p}")
        gh, gw = H // p, W // p

        if visible is None:
            final, layers = self._run(x, return_layers)
            tokens = final.flatten(2).transpose(1, 2)  # (B, N, D)
            layers = [t.flatten(2).transpose(1, 2) for t in layers]
            return Features(pooled=self.head(tokens.mean(1)), tokens=self.head(tokens), layers=layers)

        B = x.shape[0]
        if visible.dtype != torch.bool or visible.shape != (B, gh * gw):
            raise ValueError(
                f"visible must be a bool tensor of shape ({B}, {gh * gw}), "
                f"got {visible.dtype} {tuple(visible.shape)}"
            )
        if mode == "drop":
            raise ValueError(
                "a convolutional network cannot drop tokens (mode='drop'); use mode='mix' or mode='fill'"
            )
        idx = visible_indices(visible, count)  # (B, K)

        if mode == "mix":
            if B % 2:
                raise ValueError(f"mode='mix' pairs sample b with b + B/2 and needs an even batch, got B={B}")
            h = B // 2
            if reads_values(count) and bool((visible[:h] & visible[h:]).any()):
                raise ValueError("mode='mix' needs disjoint visible sets for samples b and b + B/2")
            keep = self._upsample_mask(visible[:h], gh, gw, p)  # (h, 1, H, W)
            canvas = torch.where(keep, x[:h], x[h:])
            final, layers = self._run(canvas, return_layers)
            final, layers = torch.cat([final, final]), [torch.cat([t, t]) for t in layers]
        else:  # fill
            if self.mask_token is None:
                raise ValueError("mode='fill' needs a mask token: build the backbone with fill=True")
            final, layers = self._run(x, return_layers, fill_visible=(visible, gh, gw))

        tokens = self._gather(final, idx)
        layers = [self._gather(t, idx) for t in layers]
        filled = self.head(final.flatten(2).transpose(1, 2)) if mode == "fill" else None
        return Features(pooled=self.head(tokens.mean(1)), tokens=self.head(tokens), layers=layers, filled=filled)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _upsample_mask(visible: Tensor, gh: int, gw: int, factor: int) -> Tensor:
        """(B, gh·gw) bool → (B, 1, gh·factor, gw·factor) bool, each patch blown up to factor²."""
        m = visible.reshape(-1, 1, gh, gw)
        return m.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)

    @staticmethod
    def _gather(fmap: Tensor, idx: Tensor) -> Tensor:
        """(B, D, gh, gw) map, (B, K) indices → (B, K, D) tokens."""
        tokens = fmap.flatten(2).transpose(1, 2)
        return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    def _block(self, blk: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def use_channels_last(self) -> None:
        self.channels_last = True
        self.to(memory_format=torch.channels_last)

    def _run(self, x: Tensor, return_layers: int, fill_visible=None) -> tuple[Tensor, list[Tensor]]:
        """Stem + stages; returns the final map (B, D, gh, gw) and the last maps of the final stage."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        if fill_visible is not None:
            visible, gh, gw = fill_visible
            keep = self._upsample_mask(visible, gh, gw, self.patch_size // self.stem_stride)
            x = torch.where(keep, x, self.mask_token.to(x.dtype).view(1, -1, 1, 1))
        layers: list[Tensor] = []
        last = len(self.stages) - 1
        for s, stage in enumerate(self.stages):
            x = stage.downsample(x)
            n = len(stage.blocks)
            for b, blk in enumerate(stage.blocks):
                x = self._block(blk, x)
                if s == last and b >= n - return_layers:
                    layers.append(x)
        return x, layers

    # ------------------------------------------------------------------ timm interchange

    def timm_state_dict(self, conv_mlp: bool | None = None) -> dict[str, Tensor]:
        """The weights under timm's ``ConvNeXt`` names (no mask token).

        ``conv_mlp`` (default: ``timm_conv_mlp``, True for atto … nano, as timm builds them) stores
        ``mlp.fc{1,2}.weight`` as 1×1 conv kernels (out, in, 1, 1) instead of Linear matrices.
        """
        conv_mlp = self.timm_conv_mlp if conv_mlp is None else conv_mlp
        out = {}
        for k, v in self.state_dict().items():
            if k == "mask_token":
                continue
            if conv_mlp and k.endswith(("mlp.fc1.weight", "mlp.fc2.weight")):
                v = v[:, :, None, None]
            out[k] = v
        return out

    def load_timm_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True):
        """Load timm ``ConvNeXt`` weights (Linear or 1×1-conv MLP; ``head.fc.*`` ignored)."""
        sd = {}
        for k, v in state_dict.items():
            if k.startswith("head.fc."):
                continue
            if k.endswith(("mlp.fc1.weight", "mlp.fc2.weight")) and v.ndim == 4:
                v = v.flatten(1)
            sd[k] = v
        if self.mask_token is not None:
            sd.setdefault("mask_token", self.mask_token.detach().clone())
        return self.load_state_dict(sd, strict=strict)


# ---------------------------------------------------------------------- registry

_CONFIGS = {
    # timm builds atto … nano with a 1×1-conv MLP: same weights, (out, in, 1, 1) kernels on export
    "convnext_atto": dict(dims=(40, 80, 160, 320), depths=(2, 2, 6, 2), timm_conv_mlp=True),
    "convnext_femto": dict(dims=(48, 96, 192, 384), depths=(2, 2, 6, 2), timm_conv_mlp=True),
    "convnext_pico": dict(dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), timm_conv_mlp=True),
    "convnext_nano": dict(dims=(80, 160, 320, 640), depths=(2, 2, 8, 2), timm_conv_mlp=True),
    "convnext_tiny": dict(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3)),
    "convnext_small": dict(dims=(96, 192, 384, 768), depths=(3, 3, 27, 3)),
    "convnext_base": dict(dims=(128, 256, 512, 1024), depths=(3, 3, 27, 3)),
    "convnext_large": dict(dims=(192, 384, 768, 1536), depths=(3, 3, 27, 3)),
}
for _name, _cfg in _CONFIGS.items():
    register(_name, **_cfg)(ConvNeXt)
del _name, _cfg
