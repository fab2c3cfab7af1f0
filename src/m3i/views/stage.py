"""The view stage: the views t_s, t_t of a batch, made from parameters drawn on the host.

Every random parameter of a step's views (crop boxes, flips, colour factors) and their masks is
drawn on the CPU, in the loader (:meth:`ViewStage.loader_views`) or when the batch is staged
(:meth:`ViewStage.stage`), and reaches the device with the batch, pinned and ``non_blocking``;
the device then applies them at fixed shapes (:meth:`ViewStage.make_views`), reading nothing
back. The objective owns one stage, built from the recipe's ``views`` and its backbone's grid.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ..batch import Batch, Drawn, to_device
from .augment import ViewAugment
from .loader import LoaderViews
from .masks import draw_visible, visible_count


@dataclass
class Views:
    """The augmented views of one batch and how each was made."""

    images: list[Tensor]   # each (B, C, S, S), normalised
    boxes: list[Tensor]    # each (B, 4): crop (i, j, h, w) in source pixels
    flips: list[Tensor]    # each (B,) bool
    visible: dict[int, Tensor] = field(default_factory=dict)  # (B, N) bool per masked view; drawn when absent
    # patches visible per row of the masks in ``visible``, when known (drawn from the recipe's mask):
    # the backbone then reads nothing back; None: read from the masks (a wait for the device)
    count: int | None = None


class ViewStage(nn.Module):
    """The views of a recipe (``views_cfg``: its ``views``; ``masked``: the views its terms see
    masked, ``Target.masked_views``) for a backbone of ``img_size``, ``grid_size`` patches and
    ``in_chans`` channels: one :class:`ViewAugment` per view, and the masks."""

    def __init__(self, views_cfg, masked: Sequence[int], img_size, grid_size: tuple[int, int], in_chans: int):
        super().__init__()
        self.cfg, self.masked = views_cfg, sorted(masked)
        self.grid, self.in_chans = tuple(grid_size), in_chans
        self.augment = nn.ModuleList(
            ViewAugment(size=img_size, **views_cfg.augment_for(v).model_dump()) for v in range(views_cfg.count))

    def masked_views(self) -> list[int]:
        """The views the online encoder sees masked."""
        return list(self.masked)

    def visible_count(self) -> int:
        """Patches every mask of the recipe shows per row: half the grid in the mixed input."""
        return visible_count(self.cfg, self.grid[0] * self.grid[1])

    def draw(self, images: Tensor) -> Drawn:
        """Every random parameter of the views of uint8 (B, C, H, W) ``images`` and their masks,
        drawn on the host."""
        b, c, h, w = images.shape
        return Drawn([aug.draw(b, c, h, w) for aug in self.augment],
                     {v: draw_visible(self.cfg, b, self.grid) for v in self.masked_views()})

    def loader_views(self, seed: int, rank: int = 0, interpolation: str = "bicubic") -> LoaderViews:
        """What makes these views in the data loader, from the decoded originals (``Mixture.views``):
        crops, flips, colour parameters and masks drawn from the step's generator (seeded from
        ``seed``, the step and ``rank``)."""
        return LoaderViews(list(self.augment), self.cfg, self.grid, self.masked_views(), seed, rank, interpolation)

    def stage(self, batch: Batch, device: torch.device, targets: dict, views: bool = True) -> Batch:
        """``batch`` with the views' parameters and masks (none with ``views=False``; a batch whose
        views the loader made keeps its own) and the ``targets``' host inputs, on ``device``."""
        if batch.crops is not None:
            drawn = replace(batch.drawn, targets=targets)
        else:
            drawn = replace(self.draw(batch.images) if views else Drawn(), targets=targets)
        return replace(batch, drawn=drawn).to(device)

    def views_of(self, batch: Batch | Mapping) -> Views:
        """The views of a staged batch: from the loader's crops, or made here from its images."""
        batch = Batch.of(batch)
        return self.make_views(batch.crops if batch.crops is not None else batch.images, batch.drawn)

    def make_views(self, images: Tensor | Sequence[Tensor], drawn: Drawn | None = None) -> Views:
        """uint8 (B, C, H, W) -> the augmented views with their crop boxes and flips, from the
        parameters ``drawn`` on the host (drawn now, on the host, when not given). ``images`` a
        list of each view's crops (the loader's, :meth:`loader_views`): only their colour steps
        run here."""
        cropped = isinstance(images, (list, tuple))
        if drawn is None or drawn.views is None:
            b, c, h, w = images.shape
            params = to_device([aug.draw(b, c, h, w) for aug in self.augment], images.device)
            visible, count = {}, None
        else:
            params, visible, count = drawn.views, drawn.visible, self.visible_count()
        xs = [v.float() / 255.0 for v in images] if cropped else [images.float() / 255.0] * len(self.augment)
        out = [aug.apply(x, p, cropped) for aug, x, p in zip(self.augment, xs, params)]
        return Views([o[0] for o in out], [o[1] for o in out], [o[2] for o in out], visible, count)

    # -- the backbone's input outside training ----------------------------------------------------
    @property
    def image_mean(self) -> list[float]:
        return list(self.augment[0].mean[: self.in_chans])

    @property
    def image_std(self) -> list[float]:
        return list(self.augment[0].std[: self.in_chans])

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> the backbone's input (float, normalised as in training)."""
        mean = torch.tensor(self.image_mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255 - mean) / std
