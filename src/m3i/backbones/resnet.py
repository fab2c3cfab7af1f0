"""ResNet f_θ: a residual network of 3×3 convolutions with batch norm, for small images.

The layout is ConvNeXt's (a stem, then three or four stages, each after the first downsampling
by 2, so the final stride ``patch_size`` is the stem's stride × 4 or × 8), with basic residual blocks (3×3 conv → BN → ReLU → 3×3 conv →
BN, added to the input, ReLU) in place of ConvNeXt blocks, and a 3×3 stride-2 conv + BN + ReLU
in front of the later stages. With a stride-1 or stride-2 stem it is the CIFAR-style ResNet that
suits 28–64 px images: convolutions with batch norm learn from few images per CPU-minute far faster than
attention or depthwise 7×7 blocks with layer norm (see the README's lever table).

Masking works as in :class:`~m3i.backbones.convnext.ConvNeXt` (``mix`` pastes two images along
the patch-aligned mask, ``fill`` puts a learned token at the stem's masked positions); the
forward pass is ConvNeXt's. The weights have no timm counterpart (timm's ResNet stem is a
7×7/2 conv and a max-pool), so ``m3i export`` refuses this family.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .registry import register
from .convnext import _STEM_STRIDES, ConvNeXt, ConvNeXtHead, build_stages
from ..layers import DropPath


def conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
                               nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """x + BN(conv(ReLU(BN(conv(x))))), then ReLU; drop-path on the residual branch."""

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = conv_bn(dim, dim)
        self.conv2 = conv_bn(dim, dim, relu=False)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.drop_path(self.conv2(self.conv1(x))))


class ResNetStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_paths: Sequence[float]):
        super().__init__()
        self.downsample = conv_bn(in_dim, dim, stride=2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*(BasicBlock(dim, dp) for dp in drop_paths))


class ResNet(ConvNeXt):
    """Residual 3×3-conv backbone with batch norm; the ConvNeXt forward pass and masking.

    ``frozen_patch_embed``: the stem's conv and batch-norm affine are not trained
    (`freeze_patch_embed`); its batch norm still normalises with batch statistics."""

    def __init__(self, img_size: int = 32, in_chans: int = 3, dims: Sequence[int] = (64, 128, 256, 512),
                 depths: Sequence[int] = (2, 2, 2, 2), drop_path_rate: float = 0.0, patch_size: int = 8,
                 fill: bool = False, frozen_patch_embed: bool = False):
        nn.Module.__init__(self)
        dims, depths = tuple(int(d) for d in dims), tuple(int(d) for d in depths)
        if len(dims) not in (3, 4) or min(dims) < 1 or len(depths) != len(dims) or min(depths) < 1:
            raise ValueError(f"dims and depths must be 3 or 4 positive numbers each (one per stage), "
                             f"got {dims} and {depths}")
        down = 2 ** (len(dims) - 1)  # every stage after the first halves the map
        stem_stride = int(patch_size) // down
        if stem_stride not in _STEM_STRIDES or stem_stride * down != patch_size:
            raise ValueError(f"patch_size (the final stride) must be {', '.join(str(s * down) for s in _STEM_STRIDES)} "
                             f"for {len(dims)} stages, got {patch_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")
        stride = int(patch_size)
        if img_size < stride or img_size % stride:
            raise ValueError(f"img_size={img_size} must be a positive multiple of the final stride {stride}")
        self.img_size, self.in_chans = int(img_size), int(in_chans)
        self.dims, self.depths = dims, depths
        self.stem_stride, self.patch_size = int(stem_stride), stride
        self.grid_size = (img_size // stride, img_size // stride)
        self.embed_dim = dims[-1]
        self.grad_checkpointing = False
        self.channels_last = False

        self.stem = conv_bn(in_chans, dims[0], stride=stem_stride, kernel=2 * stem_stride + 1)
        self.stages = build_stages(ResNetStage, dims, depths, drop_path_rate)
        self.head = ConvNeXtHead(dims[-1])
        self.mask_token = nn.Parameter(torch.zeros(dims[0])) if fill else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for blk in self.modules():  # each residual branch starts at zero: the block starts as identity
            if isinstance(blk, BasicBlock):
                nn.init.zeros_(blk.conv2[1].weight)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.freeze_patch_embed(frozen_patch_embed)

    def timm_state_dict(self, conv_mlp: bool | None = None) -> dict[str, Tensor]:
        raise ValueError("the resnet_* backbones have no timm layout (timm's ResNet stem is a 7×7/2 conv and a "
                         "max-pool); load their model.safetensors with m3i, or pre-train a vit_* or convnext_*")

    def load_timm_state_dict(self, state_dict, strict: bool = True):
        self.timm_state_dict()


_CONFIGS = {
    # three stages: the final stride is 4 × the stem's (a stride-2 stem gives stride 8)
    "resnet_nano": dict(dims=(32, 64, 128), depths=(1, 1, 1)),
    "resnet_micro": dict(dims=(64, 128, 256), depths=(1, 2, 2)),
    "resnet18": dict(dims=(64, 128, 256, 512), depths=(2, 2, 2, 2)),
    "resnet34": dict(dims=(64, 128, 256, 512), depths=(3, 4, 6, 3)),
}
for _name, _cfg in _CONFIGS.items():
    register(_name, **_cfg)(ResNet)
del _name, _cfg
