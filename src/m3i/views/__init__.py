"""Views: augmentation with recorded geometry, patch masks, relative positions (t_s, t_t), and the
stage that makes a batch's views from parameters drawn on the host."""
from .augment import ViewAugment, crop_boxes, resized_crop
from .loader import LoaderViews, crop_view
from .masks import (block_mask, draw_masks, draw_visible, grid_shape, mask_counts, mix_visible, num_masked, random_mask,
                    visible_count)
from .relpos import absolute_positions, relative_positions, sincos_embed
from .stage import Views, ViewStage, check_local_views, grid_of

__all__ = [
    "ViewAugment",
    "ViewStage",
    "Views",
    "check_local_views",
    "grid_of",
    "resized_crop",
    "crop_boxes",
    "LoaderViews",
    "crop_view",
    "random_mask",
    "block_mask",
    "mix_visible",
    "num_masked",
    "grid_shape",
    "draw_visible",
    "draw_masks",
    "mask_counts",
    "visible_count",
    "relative_positions",
    "absolute_positions",
    "sincos_embed",
]
