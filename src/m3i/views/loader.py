"""The views of a training batch, made where the data is: in the loader, from the decoded originals.

Each view of a sample is cut from the image as its source decoded it (its own size and aspect
ratio, at full detail), resized to the view's size with antialiasing and mirrored where drawn, as
MAE, SIM and DINO take their crops; a 0.08-area crop of a 1024-px photo keeps its ~290 source
pixels across instead of being cut from an already shrunk square. Every random parameter of the
step (crop boxes, flips, colour factors, masks) comes from one generator seeded from
``(seed, step, rank)``, so a batch is a pure function of its step: DataLoader workers, a resumed
run and a run that never stopped draw the same views.

The device then runs only the colour steps and the normalisation
(:meth:`~m3i.views.augment.ViewAugment.apply` with ``cropped=True``) on uint8 crops that reach it
pinned and ``non_blocking``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..batch import Drawn
from .augment import ViewAugment
from .masks import draw_masks

__all__ = ["LoaderViews", "crop_view", "decode_side", "view_groups", "draw_params"]

_VIEW_TAG = 0x6D3376  # separates the views' stream from the mixture's sample streams


def crop_view(image: Image.Image, box: Sequence[float], flip: bool, size: tuple[int, int],
              resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """The view of an RGB image for one crop box ``(i, j, h, w)`` (source pixels, the box spans
    ``[j, j + w) × [i, i + h)``): resized to ``size`` = (Sh, Sw) with antialiasing, mirrored
    left-right where ``flip``; uint8 (Sh, Sw, 3)."""
    i, j, h, w = (float(v) for v in box)
    out = image.resize((size[1], size[0]), resample, box=(j, i, j + w, i + h))
    if flip:  # PIL mirrors row by row in C: several times faster than copying a reversed numpy view
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def view_groups(views_cfg, n: int) -> list[list[int]]:
    """The views ``0 .. n-1`` of a recipe's ``views`` as groups drawn and coloured together: each
    global view alone, multi-crop's local crops (one size, one augmentation) as one group."""
    local = views_cfg.local_views()[: max(0, n - views_cfg.count)]
    return [[v] for v in range(n) if v not in local] + ([local] if local else [])


def draw_params(augments: Sequence[ViewAugment], views_cfg, batch: int, channels: int, height: int | Tensor,
                width: int | Tensor, generator: torch.Generator | None = None) -> list[dict]:
    """Every random parameter of the views of ``batch`` images (one :class:`ViewAugment` per view),
    one dict per view, drawn on the host: a global view by its own :meth:`ViewAugment.draw`, the
    local crops together (:meth:`ViewAugment.draw_views`)."""
    params: list[dict | None] = [None] * len(augments)
    for group in view_groups(views_cfg, len(augments)):
        aug = augments[group[0]]
        if len(group) == 1:
            drawn = [aug.draw(batch, channels, height, width, generator=generator)]
        else:
            drawn = aug.draw_views(len(group), batch, channels, height, width, generator=generator)
        for v, p in zip(group, drawn):
            params[v] = p
    return params


def decode_side(augments: Sequence[ViewAugment]) -> int:
    """The side a JPEG may be decoded down to (its draft) so that the smallest crop any view can
    draw still has at least the view's pixels across (multi-crop's local crops included: a small
    crop scale at a small size)."""
    side = 1
    for aug in augments:
        lo = aug.crop_scale[0]
        widest = max(aug.crop_ratio[1], 1 / aug.crop_ratio[0])  # the crop's short side over sqrt(area)
        side = max(side, math.ceil(max(aug.size) / math.sqrt(lo / widest)))
    return side


class LoaderViews:
    """Makes every view of a batch from its decoded images: the global views and multi-crop's
    local crops alike, each at its own augmentation's size.

    Args:
        augments: one :class:`~m3i.views.augment.ViewAugment` per view (its crop, flip and colour
            settings).
        views_cfg: the recipe's ``views`` (mask kind and ratio, input mode).
        grid: the backbone's patch grid ``(gh, gw)``: that of the masked (global) views.
        masked: the views that carry a mask (their visible sets are drawn here too).
        seed, rank: with the step, what the generator of a batch's views is seeded from.
        interpolation: PIL resampling of the crops' resize (``bicubic``, ``bilinear``, ...).
    """

    def __init__(self, augments: Sequence[ViewAugment], views_cfg, grid: tuple[int, int], masked: Sequence[int],
                 seed: int = 0, rank: int = 0, interpolation: str = "bicubic"):
        self.augments, self.views_cfg, self.grid = list(augments), views_cfg, tuple(grid)
        self.masked = list(masked)
        self.seed, self.rank = int(seed), int(rank)
        self.resample = Image.Resampling[interpolation.upper()]
        self.side = decode_side(self.augments)

    def generator(self, step: int) -> torch.Generator:
        """The generator of every random parameter of ``step``'s views on this rank."""
        seed = np.random.SeedSequence([self.seed, int(step), self.rank, _VIEW_TAG]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(seed))

    def __call__(self, images: Sequence[Image.Image], step: int) -> tuple[list[Tensor], Drawn]:
        """RGB images of one batch -> (each view's crops, uint8 (B, 3, Sh, Sw); the drawn
        parameters: ``views`` (one dict per view, as :meth:`ViewAugment.draw` returns, boxes in
        each image's own pixels) and ``visible`` ({view: (B, N) bool}))."""

        g = self.generator(step)
        b = len(images)
        heights = torch.tensor([im.height for im in images])
        widths = torch.tensor([im.width for im in images])
        params = draw_params(self.augments, self.views_cfg, b, 3, heights, widths, generator=g)
        crops = [self.cut(images, p, aug.size) for aug, p in zip(self.augments, params)]
        visible = draw_masks(self.views_cfg, b, self.grid, self.masked, generator=g)
        return crops, Drawn(params, visible)

    def cut(self, images: Sequence[Image.Image], params: dict, size: tuple[int, int]) -> Tensor:
        """One view's crops of ``images`` (its drawn ``box`` and ``flip`` per image): uint8 (B, 3, Sh, Sw)."""
        boxes, flips = params["box"].tolist(), params["flip"].tolist()
        pixels = np.empty((len(images), size[0], size[1], 3), dtype=np.uint8)
        for k, im in enumerate(images):
            pixels[k] = crop_view(im, boxes[k], flips[k], size, self.resample)
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
