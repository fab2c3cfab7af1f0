"""A light anchor-free detection head: CenterNet (Zhou et al., "Objects as Points", 2019).

Each object is the peak of a per-class heatmap at its box centre on a grid of stride
``OUTPUT_STRIDE``, plus the box's width and height and the centre's offset inside its cell,
regressed at the peak. Targets: a Gaussian per object on its class's heatmap, 1 at the centre
cell, σ = α · (width, height) / 6 with α = 0.54 (TTFNet's elliptical form of CenterNet's radius).
Loss: CenterNet's penalty-reduced focal loss on the heatmap, L1 on size (weight 0.1) and offset
(weight 1) at the true centres. Decoding: the peaks of a 3 × 3 max-pool, the top ``k`` of all
classes and cells.

The head reads any (B, D, h, w) feature map: batch norm (no affine) over the channels, a 1 × 1
projection to ``width`` channels, resampling to the output grid (the one stride-4 level of a
ViTDet-style simple feature pyramid: the scenes' objects span a narrow range of sizes), two
3 × 3 convolutions, then the three 1 × 1 outputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUTPUT_STRIDE = 4  # pixels per cell of the output grid: 16 × 16 on a 64-pixel canvas
WIDTH = 64
GAUSS_ALPHA = 0.54  # TTFNet (Liu et al., 2020)
SIZE_WEIGHT, OFFSET_WEIGHT = 0.1, 1.0
HEAT_PRIOR = 0.1  # the heatmap's initial probability (CenterNet's bias of −2.19)


def _conv_gn(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.GroupNorm(8, cout), nn.ReLU(inplace=True))


class CenterNetHead(nn.Module):
    """(B, D, h, w) features -> heatmap logits (B, C, G, G), sizes (B, 2, G, G), offsets (B, 2, G, G)."""

    def __init__(self, dim: int, num_classes: int, grid: int, width: int = WIDTH):
        super().__init__()
        self.grid = grid
        self.norm = nn.BatchNorm2d(dim, affine=False)
        self.neck = _conv_gn(dim, width, 1)
        self.tower = nn.Sequential(_conv_gn(width, width, 3), _conv_gn(width, width, 3))
        self.heat = nn.Conv2d(width, num_classes, 1)
        self.size = nn.Conv2d(width, 2, 1)
        self.offset = nn.Conv2d(width, 2, 1)
        nn.init.constant_(self.heat.bias, -math.log((1 - HEAT_PRIOR) / HEAT_PRIOR))

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.neck(self.norm(feats.float()))
        g = self.grid
        if x.shape[-1] > g:
            x = F.adaptive_avg_pool2d(x, g)
        elif x.shape[-1] < g:
            x = F.interpolate(x, size=(g, g), mode="bilinear", align_corners=False)
        x = self.tower(x)
        return self.heat(x), self.size(x), self.offset(x)


def center_targets(boxes: Tensor, labels: Tensor, valid: Tensor, num_classes: int, grid: int,
                   stride: int = OUTPUT_STRIDE) -> dict[str, Tensor]:
    """Padded truth (B, M, 4) xyxy pixels, (B, M) labels, (B, M) valid -> the head's targets:
    ``heat`` (B, C, G, G), and per object its cell ``index`` (B, M), ``size`` and ``offset`` (B, M, 2)
    in cells, and ``valid``."""
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2 / stride  # (B, M, 2) x, y in cells
    cell = centre.floor().clamp(0, grid - 1)
    size = (boxes[..., 2:] - boxes[..., :2]) / stride
    sigma = (GAUSS_ALPHA * size / 6).clamp_min(1e-3)[..., None, None]  # (B, M, 2, 1, 1)
    g = torch.arange(grid, dtype=boxes.dtype, device=boxes.device)
    dx = (g.view(1, 1, 1, -1) - cell[..., 0, None, None]) ** 2 / (2 * sigma[:, :, 0] ** 2)
    dy = (g.view(1, 1, -1, 1) - cell[..., 1, None, None]) ** 2 / (2 * sigma[:, :, 1] ** 2)
    gauss = torch.exp(-(dx + dy)) * valid[..., None, None]  # (B, M, G, G)
    b, m = labels.shape
    heat = torch.zeros(b, num_classes, grid * grid, dtype=boxes.dtype, device=boxes.device)
    heat.scatter_reduce_(1, labels.clamp_min(0)[..., None].expand(b, m, grid * grid), gauss.reshape(b, m, -1), "amax")
    index = (cell[..., 1] * grid + cell[..., 0]).long()
    return {"heat": heat.view(b, num_classes, grid, grid), "index": index, "size": size, "offset": centre - cell,
            "valid": valid}


def focal_loss(logits: Tensor, heat: Tensor) -> Tensor:
    """CenterNet's penalty-reduced focal loss (α = 2, β = 4), summed and divided by the objects."""
    pos = heat.eq(1).float()
    p = torch.sigmoid(logits)
    pos_loss = (1 - p) ** 2 * F.logsigmoid(logits) * pos
    neg_loss = (1 - heat) ** 4 * p ** 2 * F.logsigmoid(-logits) * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp_min(1)


def _at(maps: Tensor, index: Tensor) -> Tensor:
    """(B, K, G, G) maps read at flat cells (B, M) -> (B, M, K)."""
    flat = maps.flatten(2)
    return flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)


def center_loss(out: tuple[Tensor, Tensor, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
    """The heatmap's focal loss and the L1 losses of size and offset at the true centres."""
    logits, size, offset = (o.float() for o in out)
    valid = targets["valid"].float()[..., None]
    n = valid.sum().clamp_min(1) * 2
    size_l1 = ((_at(size, targets["index"]) - targets["size"]).abs() * valid).sum() / n
    offset_l1 = ((_at(offset, targets["index"]) - targets["offset"]).abs() * valid).sum() / n
    heat = focal_loss(logits, targets["heat"])
    return {"loss": heat + SIZE_WEIGHT * size_l1 + OFFSET_WEIGHT * offset_l1, "heat": heat, "size": size_l1,
            "offset": offset_l1}


@torch.no_grad()
def decode(out: tuple[Tensor, Tensor, Tensor], k: int, canvas: int,
           stride: int = OUTPUT_STRIDE) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The head's outputs -> per canvas the top ``k`` peaks: boxes (k, 4) xyxy pixels, scores, labels."""
    logits, size, offset = (o.float() for o in out)
    b, c, g, _ = logits.shape
    p = torch.sigmoid(logits)
    p = p * (F.max_pool2d(p, 3, stride=1, padding=1) == p)
    scores, flat = p.flatten(1).topk(min(k, c * g * g), dim=1)
    labels, cell = flat // (g * g), flat % (g * g)
    xy = torch.stack([cell % g, cell // g], dim=-1).float() + _at(offset, cell)
    wh = _at(size, cell).clamp_min(0)
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=-1).mul(stride).clamp(0, canvas)
    return [(boxes[i].cpu(), scores[i].cpu(), labels[i].cpu()) for i in range(b)]
