"""Objective behaviour beyond the per-recipe formulas: the paper's paired targets in the mix input."""
import torch

from m3i.config import load_recipe
from m3i.objective import Context, Objective
from m3i.views import absolute_positions, relative_positions

OV = ["backbone.name=vit_nano", "backbone.depth=2", "backbone.patch_size=8", "terms.2.target_encoder.tower=scratch"]


def batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g),
            "label": torch.full((b,), -1), "caption": [None] * b}


def test_paired_targets_first_image_predicts_its_own_view_partner_the_other():
    torch.manual_seed(0)
    obj = Objective(load_recipe("m3i", overrides=OV + ["terms.0.target.paired=true"]), 10)
    b = batch()
    views = obj.make_views(b["image"])
    ctx = Context(obj, b, views)
    images, boxes, flips = ctx.view(("paired", 0, 1))
    assert torch.equal(images[:4], views.images[0][:4]) and torch.equal(images[4:], views.images[1][4:])
    q = relative_positions(views.boxes[0], views.flips[0], boxes, flips, obj.backbone.grid_size)
    # the first image of each canvas queries its own view: the positions are its own grid, unscaled
    assert torch.allclose(q[:4], absolute_positions(obj.backbone.grid_size).expand(4, -1, -1), atol=1e-5)
    assert not torch.allclose(q[4:], absolute_positions(obj.backbone.grid_size).expand(4, -1, -1), atol=1e-3)
    # and the loss differs from every sample predicting view 2 (same masks, same views)
    from m3i.views import mix_visible

    views.visible = {0: mix_visible(8, obj.backbone.grid_size)}
    paired = obj(b, views)["dense"]
    obj.recipe.terms[0].target.paired = False
    unpaired = obj(b, views)["dense"]
    assert abs(float(paired) - float(unpaired)) > 1e-4


def test_paired_needs_the_mix_input():
    import pytest

    from m3i.config import ConfigError

    with pytest.raises(ConfigError, match="terms.0.target.paired"):
        load_recipe("m3i", overrides=["terms.0.target.paired=true", "views.input_mode=drop"])
