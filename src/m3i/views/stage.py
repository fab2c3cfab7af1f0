"""The view stage: the views t_s, t_t of a batch, made from parameters drawn on the host.

Every random parameter of a step's views (crop boxes, flips, colour factors) and their masks is
drawn on the CPU, in the loader (:meth:`ViewStage.loader_views`) or when the batch is staged
(:meth:`ViewStage.stage`), and reaches the device with the batch, pinned and ``non_blocking``;
the device then applies them at fixed shapes (:meth:`ViewStage.make_views`), reading nothing
back. The objective owns one stage, built from the recipe's ``views`` and its backbone's grid.

The views of a sample are the global views ``0 .. views.count - 1`` at the backbone's
``img_size``, then multi-crop's local crops (``views.local``: DINO's small crops, seen whole by the
online encoder alone) at ``views.local.size``, each group with its own augmentation; a local
crop has the smaller patch grid of its size (:meth:`ViewStage.grid_of`). Masks sit on the global
views only.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ..batch import Batch, Drawn, to_device
from .augment import ViewAugment, resized_crop
from .loader import LoaderViews, draw_params, view_groups
from .masks import draw_masks, visible_count


@dataclass
class Views:
    """The augmented views of one batch and how each was made."""

    images: list[Tensor]   # each (B, C, S, S), normalised: the global views, then the local crops (smaller S)
    boxes: list[Tensor]    # each (B, 4): crop (i, j, h, w) in source pixels
    flips: list[Tensor]    # each (B,) bool
    visible: dict[int, Tensor] = field(default_factory=dict)  # (B, N) bool per masked view; drawn when absent
    # patches visible per row of the masks in ``visible``, when known (drawn from the recipe's mask):
    # the backbone then reads nothing back; None: read from the masks (a wait for the device).
    # Masks whose rows differ (``views.mask.ratio: [lo, hi]``, ``probability``) give the grid's every
    # patch: the ``fill`` input keeps every token
    count: int | None = None


def grid_of(views_cfg, view: int, grid: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """The patch grid of ``view`` (a view index of ``views_cfg``, the recipe's ``views``) for a
    backbone of ``grid`` patches of ``patch_size`` pixels: its own for a global view, a local
    crop's ``views.local.size // patch_size`` across."""
    if not isinstance(view, int) or view < views_cfg.count:
        return tuple(grid)
    side = views_cfg.local.size // patch_size
    return (side, side)


def check_local_views(views_cfg, backbone) -> None:
    """Refuse local crops that ``backbone`` cannot take, in one line naming ``views.local.size``:
    a size that is no multiple of its patch size (final stride), or a timm model built for one
    input size (its ``img_size``)."""
    local = views_cfg.local
    if local is None:
        return
    p = backbone.patch_size
    if local.size % p:
        raise ValueError(f"views.local.size: {local.size} px is no multiple of the backbone's patch size {p} "
                         f"({backbone.img_size} px images, a {backbone.grid_size[0]}-patch grid); use "
                         f"{max(p, local.size // p * p)} or {(local.size // p + 1) * p}")
    if "img_size" in getattr(backbone, "create_args", {}):
        raise ValueError(f"views.local.size: timm builds {getattr(backbone, 'model_name', 'this model')} for "
                         f"{backbone.img_size}-px input alone, so it cannot take {local.size}-px local crops; use an "
                         f"m3i backbone (vit_*, convnext_*, resnet_*) or leave views.local out")


class ViewStage(nn.Module):
    """The views of a recipe (``views_cfg``: its ``views``; ``masked``: the views its terms see
    masked, ``Target.masked_views``) for a backbone of ``img_size``, ``grid_size`` patches and
    ``in_chans`` channels: one :class:`ViewAugment` per view (``views.total``: the global views at
    ``img_size``, then the local crops at ``views.local.size``), and the masks."""

    def __init__(self, views_cfg, masked: Sequence[int], img_size, grid_size: tuple[int, int], in_chans: int):
        super().__init__()
        self.cfg, self.masked = views_cfg, sorted(masked)
        self.grid, self.in_chans = tuple(grid_size), in_chans
        self.patch_size = img_size // self.grid[0]
        local = [v for v in self.masked if v >= views_cfg.count]
        if local:
            raise ValueError(f"views.local: view {local[0]} is a local crop, which the online encoder sees whole; "
                             f"masks sit on the global views 0..{views_cfg.count - 1} (source.masked)")
        self.augment = nn.ModuleList(
            ViewAugment(size=views_cfg.size_of(v, img_size), **views_cfg.augment_for(v).model_dump())
            for v in range(views_cfg.total))

    def masked_views(self) -> list[int]:
        """The views the online encoder sees masked."""
        return list(self.masked)

    def grid_of(self, view: int) -> tuple[int, int]:
        """The patch grid of ``view``: the backbone's for a global view, smaller for a local crop."""
        return grid_of(self.cfg, view, self.grid, self.patch_size)

    def visible_count(self) -> int:
        """Patches every mask of the recipe shows per row: half the grid in the mixed input; every
        patch where the rows' counts differ (read as the ``fill`` input keeps them)."""
        return visible_count(self.cfg, self.grid[0] * self.grid[1])

    def draw_visible(self, batch: int, generator: torch.Generator | None = None) -> dict[int, Tensor]:
        """The masks of a batch of ``batch``: ``{masked view: (B, N) bool}``, drawn on the host."""
        return draw_masks(self.cfg, batch, self.grid, self.masked_views(), generator)

    def draw(self, images: Tensor) -> Drawn:
        """Every random parameter of the views of uint8 (B, C, H, W) ``images`` and their masks,
        drawn on the host."""
        b, c, h, w = images.shape
        return Drawn(draw_params(list(self.augment), self.cfg, b, c, h, w), self.draw_visible(b))

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
        run here. The local crops are coloured in one call, on their concatenation."""
        cropped = isinstance(images, (list, tuple))
        if drawn is None or drawn.views is None:
            b, c, h, w = images.shape
            params = to_device(draw_params(list(self.augment), self.cfg, b, c, h, w), images.device)
            visible, count = {}, None
        else:
            params, visible, count = drawn.views, drawn.visible, self.visible_count()
        if cropped:
            xs = [v.float() / 255.0 for v in images]
        else:
            x01 = images.float() / 255.0
            xs = [resized_crop(x01, p["box"], p["flip"], aug.size) for aug, p in zip(self.augment, params)]
        out: list[Tensor | None] = [None] * len(xs)
        for group in view_groups(self.cfg, len(xs)):
            for v, view in zip(group, self._colour(group, xs, params)):
                out[v] = view
        return Views(out, [p["box"] for p in params], [p["flip"] for p in params], visible, count)

    def _colour(self, group: list[int], xs: list[Tensor], params: list[dict]) -> list[Tensor]:
        """The colour steps and normalisation of a group of views (:func:`view_groups`): the local
        crops in one call on their concatenation, when they share the jitter steps' order (as
        :meth:`ViewAugment.draw_views` draws them)."""
        aug = self.augment[group[0]]
        one = [params[v] for v in group]
        if len(group) == 1 or any(p.get("order") != one[0].get("order") for p in one):
            return [self.augment[v].normalise(self.augment[v].colour(xs[v], params[v])) for v in group]
        joint = {k: torch.cat([p[k] for p in one]) if isinstance(x, Tensor) else x for k, x in one[0].items()}
        return list(aug.normalise(aug.colour(torch.cat([xs[v] for v in group]), joint)).split(xs[group[0]].shape[0]))

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
