"""Objective behaviour beyond the per-recipe formulas: the paper's paired targets in the mix input."""
import torch

from m3i.config import load_recipe
from m3i.objective import Objective, Views
from m3i.terms import Pair
from m3i.views import relative_positions

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
    ctx = obj.context(b, views)
    images, boxes, flips = ctx.view(Pair(0, 1))
    assert torch.equal(images[:4], views.images[0][:4]) and torch.equal(images[4:], views.images[1][4:])
    q = relative_positions(views.boxes[0], views.flips[0], boxes, flips, obj.backbone.grid_size)
    # the first image of each canvas queries its own view: the positions are its own 4 × 4 grid
    # (r, c), unscaled; its partner queries view 2, cropped elsewhere
    own = torch.tensor([[r, c, 0.0, 0.0] for r in range(4) for c in range(4)]).expand(4, -1, -1)
    assert torch.allclose(q[:4], own, atol=1e-5)
    assert not torch.allclose(q[4:], own, atol=1e-3)
    # and the loss is the unpaired one (every sample predicting view 2) once the first image of each
    # canvas has its own view -- picture, crop and flip -- in place of view 2 (same masks)
    from m3i.views import mix_visible

    views.visible = {0: mix_visible(8, obj.backbone.grid_size)}
    paired = obj(b, views)["dense"]
    own_first = [torch.cat([v[0][:4], v[1][4:]]) for v in (views.images, views.boxes, views.flips)]
    swapped = Views([views.images[0], own_first[0]], [views.boxes[0], own_first[1]],
                    [views.flips[0], own_first[2]], dict(views.visible))
    obj.recipe.terms[0].target.paired = False
    torch.testing.assert_close(obj(b, swapped)["dense"], paired, rtol=1e-5, atol=1e-6)


def test_paired_needs_the_mix_input():
    import pytest

    from m3i.config import ConfigError

    with pytest.raises(ConfigError, match="terms.0.target.paired"):
        load_recipe("m3i", overrides=["terms.0.target.paired=true", "views.input_mode=drop"])


SMALL = ["backbone.name=vit_micro", "backbone.depth=2", "backbone.patch_size=8"]


def test_a_frozen_target_encoder_reads_its_file_and_is_never_trained_or_saved(tmp_path):
    from safetensors.torch import save_file

    from m3i.backbones import build_backbone

    torch.manual_seed(1)
    source = build_backbone("vit_micro", img_size=32, depth=2, patch_size=8)
    path = tmp_path / "teacher.safetensors"  # a run's layout: the backbone's tensors under "backbone."
    save_file({f"backbone.{k}": v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(0)
    frozen_cfg = f"terms.0.target_encoder={{kind: frozen, head: true, weights: {path}}}"
    obj = Objective(load_recipe("byol", overrides=SMALL + [frozen_cfg]))
    frozen = obj.frozen["view"].backbone
    for k, v in source.state_dict().items():
        assert torch.equal(frozen.state_dict()[k], v), k
    assert not any(torch.equal(obj.backbone.state_dict()[k], v) for k, v in source.state_dict().items()
                   if k.endswith("weight") and v.dim() > 1)  # the online backbone keeps its own initialisation
    assert not any(p.requires_grad for p in obj.frozen.parameters())
    assert all(p is not q for p in obj.param_groups(0.05)[0]["params"] for q in obj.frozen.parameters())
    assert not any(k.startswith("frozen.") for k in obj.checkpoint_state())
    out = obj(batch())
    out["loss"].backward()
    assert all(p.grad is None for p in obj.frozen.parameters())


def test_a_frozen_target_encoder_of_another_shape_is_refused_naming_the_file(tmp_path):
    import pytest
    from safetensors.torch import save_file

    from m3i.backbones import build_backbone

    other = build_backbone("vit_micro", img_size=32, depth=2, patch_size=8, embed_dim=32, num_heads=2)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"target_encoder.weights .*other.safetensors.*shapes differ"):
        Objective(load_recipe("byol", overrides=SMALL + [f"terms.0.target_encoder={{kind: frozen, head: true, weights: {path}}}"]))


def test_a_copied_target_without_head_must_match_the_prediction_width(tmp_path):
    import pytest

    # byol's predictor ends at 128; vit_micro's pooled features are 192 wide
    with pytest.raises(ValueError, match="terms.view: the prediction is 128 wide but the target.*192 wide"):
        Objective(load_recipe("byol", overrides=SMALL + ["terms.0.target_encoder.head=false"]))
    ok = Objective(load_recipe("byol", overrides=SMALL + ["terms.0.target_encoder.head=false",
                                                          "terms.0.decoder.predictor=[512, 192]"]))
    assert ok(batch())["loss"].isfinite()


def test_swap_views_on_a_label_or_caption_term_adds_the_other_views_prediction():
    """``swap_views`` on a target that is no image view (label, caption) predicts it from both views:
    the term is the sum of the same term read from view 1 and from view 2 (found by the fuzz test,
    where it once failed at run time)."""
    small = ["backbone.name=vit_nano", "backbone.depth=1", "backbone.patch_size=8", "views.count=2"]
    for recipe, extra in (("supervised", []), ("clip", ["terms.0.target_encoder.tower=scratch",
                                                         "terms.0.target_encoder.width=16",
                                                         "terms.0.target_encoder.depth=1"])):
        torch.manual_seed(0)
        both = Objective(load_recipe(recipe, overrides=small + extra + ["terms.0.swap_views=true"]), 10).eval()
        one = [Objective(load_recipe(recipe, overrides=small + extra + [f"terms.0.source.view={v}"]), 10).eval()
               for v in (0, 1)]
        for o in one:
            o.load_state_dict(both.state_dict())
        b = batch()
        b["caption"] = [f"caption {i % 3}" if i % 4 else None for i in range(8)]
        b["label"] = torch.tensor([0, 1, -1, 2, 1, -1, 0, 2])
        torch.manual_seed(1)
        views = both.make_views(b["image"])
        name = both.terms[0].name
        with torch.no_grad():
            got = both(b, views)
            parts = [o(b, views) for o in one]
        torch.testing.assert_close(got[name], parts[0][name] + parts[1][name])
        assert int(got["n_" + name]) == int(parts[0]["n_" + name]) + int(parts[1]["n_" + name]) > 0
