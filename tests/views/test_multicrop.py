"""Multi-crop's local crops (``views.local``): cut in the loader at their own size inside each image,
a function of the step through workers, ranks and a resume, run through the backbone as one
batch, and refused where the backbone cannot take their size."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from m3i.backbones import build_backbone
from m3i.config import ConfigError, load_recipe
from m3i.data import Mixture
from m3i.objective import Objective
from m3i.train import preflight
from m3i.views import crop_view
import test_loader_views

pytestmark = pytest.mark.usefixtures("one_thread")
photos = test_loader_views.photos  # the same image folder fixture

B = 4
# two 32-px global views (8 × 8 patches of 4 px) and two 16-px local crops; the term reads view 2
LOCAL = ["backbone.name=vit_nano", "backbone.depth=1", f"data.batch_size={B}", "views.local={count: 2, size: 16}",
         "terms.0.target.view=2"]
# masks on view 0 that hide different numbers of patches (DINOv2's): the fill input only
VARYING = ["terms.0.source.masked=true", "views.input_mode=fill", "views.mask.ratio=[0.2, 0.6]",
           "views.mask.probability=0.5"]


def objective(*overrides: str, recipe: str = "simclr") -> Objective:
    torch.manual_seed(0)
    return Objective(load_recipe(recipe, overrides=LOCAL + list(overrides)), num_classes=2)


def mixture(src, obj: Objective, **kw) -> Mixture:
    mix = Mixture([src], None, batch_size=B, image_size=32, seed=0, num_steps=6, **kw)
    mix.views = obj.loader_views(0, rank=kw.get("rank", 0))
    return mix


def test_local_crops_are_cut_at_their_size_inside_each_image(photos):
    obj = objective()
    local = obj.recipe.views.local
    batch = mixture(photos, obj).batch(0)
    assert [tuple(c.shape) for c in batch.crops] == [(B, 3, 32, 32)] * 2 + [(B, 3, 16, 16)] * 2
    images = [photos.get(int(i))["image"].convert("RGB") for i in batch.index]
    for v, p in enumerate(batch.drawn.views):
        i, j, h, w = p["box"].unbind(1)
        H = torch.tensor([im.height for im in images], dtype=torch.float32)
        W = torch.tensor([im.width for im in images], dtype=torch.float32)
        assert torch.all((i >= 0) & (j >= 0) & (i + h <= H) & (j + w <= W) & (h >= 1) & (w >= 1))
        if v >= 2:  # the local crops' area range, up to whole pixels: |h·w − area| <= (h + w)/2 + 1
            lo, hi = local.augment.crop_scale
            slack = (h + w) / 2 + 1
            assert torch.all((h * w >= lo * H * W - slack) & (h * w <= hi * H * W + slack))
        for k, im in enumerate(images):  # each crop is its image's box at the view's size
            size = (16, 16) if v >= 2 else (32, 32)
            ref = crop_view(im, p["box"][k].tolist(), bool(p["flip"][k]), size)
            assert np.array_equal(batch.crops[v][k].permute(1, 2, 0).numpy(), ref), (v, k)
    # the local crops cover a smaller share of their image than the global views on average
    share = [float((p["box"][:, 2] * p["box"][:, 3]).mean()) for p in batch.drawn.views]
    assert max(share[2:]) < min(share[:2])


def test_the_device_side_views_make_local_crops_too():
    """Images already on the device (evaluation, the dry run): the local crops are resized there."""
    obj = objective()
    images = torch.randint(0, 256, (B, 3, 40, 40), dtype=torch.uint8)
    views = obj.views_of(obj.stage({"image": images}, torch.device("cpu")))
    assert [tuple(x.shape) for x in views.images] == [(B, 3, 32, 32)] * 2 + [(B, 3, 16, 16)] * 2
    for box in views.boxes:
        assert torch.all((box[:, :2] >= 0) & (box[:, :2] + box[:, 2:] <= 40))


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def drawn_of(batch) -> tuple:
    return batch.crops, batch.drawn.views, batch.drawn.visible


@pytest.mark.parametrize("rank", [0, 1])
def test_local_crops_and_varying_masks_are_a_function_of_the_step(photos, rank):
    """Through DataLoader workers (any number), read again, or resumed at a later step: the same
    crops, parameters and masks, on every rank of a world of 2."""
    obj = objective(*VARYING)
    world = {"rank": rank, "world_size": 2}
    mix = mixture(photos, obj, **world)
    direct = [mix.batch(s) for s in range(6)]
    assert len(direct[0].crops) == 4 and set(direct[0].drawn.visible) == {0}
    assert not torch.equal(direct[1].crops[2], direct[2].crops[2])
    assert same(drawn_of(mix.batch(4)), drawn_of(direct[4]))
    for workers in (1, 2):
        loaded = list(DataLoader(mixture(photos, obj, **world), batch_size=None, num_workers=workers))
        assert all(same(drawn_of(a), drawn_of(b)) for a, b in zip(direct, loaded))
    resumed = mixture(photos, obj, start_step=3, **world)
    loaded = list(DataLoader(resumed, batch_size=None, num_workers=2))
    assert len(loaded) == 3 and all(same(drawn_of(a), drawn_of(b)) for a, b in zip(direct[3:], loaded))
    other = mixture(photos, obj, rank=1 - rank, world_size=2).batch(0)
    assert not torch.equal(other.drawn.views[2]["box"], direct[0].drawn.views[2]["box"])


def test_every_local_crop_runs_through_the_backbone_in_one_call():
    obj = objective("views.local={count: 3, size: 16}", "terms.0.target.view=3").eval()
    batch = obj.stage({"image": torch.randint(0, 256, (B, 3, 36, 36), dtype=torch.uint8)}, torch.device("cpu"))
    views = obj.views_of(batch)
    net, calls = obj.backbone, []
    real = net.forward_features

    def counted(x, *a, **k):
        calls.append(tuple(x.shape))
        return real(x, *a, **k)

    net.forward_features = counted
    ctx = obj.context(batch, views)
    assert ctx.grid_of(0) == (8, 8) and ctx.grid_of(3) == (4, 4)
    feats = {v: ctx.online(v, False) for v in (3, 2, 4)}  # any local crop first: all of them at once
    assert calls == [(3 * B, 3, 16, 16)]
    with torch.no_grad():
        for v, f in feats.items():  # each crop's share equals the crop run alone
            ref = real(views.images[v])
            assert f.tokens.shape == (B, 16, net.embed_dim)
            torch.testing.assert_close(f.pooled, ref.pooled, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(f.tokens, ref.tokens, rtol=1e-5, atol=1e-5)
    calls.clear()
    out = obj(batch, views)  # the step: view 0, then the local crops once
    assert torch.isfinite(out.loss) and calls == [(B, 3, 32, 32), (3 * B, 3, 16, 16)]


def test_a_local_size_the_backbone_cannot_take_is_refused_when_the_recipe_is_read():
    with pytest.raises(ConfigError, match=r"simclr.yaml \+ overrides: views.local.size: 18 px is no multiple of the "
                                          r"backbone's patch size 4 \(32 px images, a 8-patch grid\); use 16 or 20$"):
        objective("views.local={count: 2, size: 18}")
    # a ConvNeXt's patch is its final stride (8 here): it takes 16-px crops, not 12-px ones
    conv = ["backbone.name=convnext_atto", "backbone.depth=null"]
    with pytest.raises(ConfigError, match=r"views.local.size: 12 px is no multiple of the backbone's patch size 8 ") as e:
        objective(*conv, "views.local={count: 2, size: 12}")
    assert "\n" not in str(e.value)
    obj = objective(*conv)
    out = obj(obj.stage({"image": torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)}, torch.device("cpu")))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name,kw", [("vit_nano", {"patch_size": 4}), ("convnext_atto", {"stem_stride": 1}),
                                     ("resnet_nano", {"patch_size": 8})])
def test_backbones_take_a_local_crops_size(name, kw):
    net = build_backbone(name, img_size=32, **kw).eval()
    f = net.forward_features(torch.randn(2, 3, 16, 16))
    n = (16 // net.patch_size) ** 2
    assert f.tokens.shape == (2, n, net.embed_dim) and f.pooled.shape == (2, net.embed_dim)


def test_local_crops_are_normalised_as_the_global_views():
    r = load_recipe("simclr", overrides=["views.augment=[{mean: [0.4, 0.4, 0.4]}]", "views.local={count: 2, size: 16}"])
    assert r.views.local.augment.mean == (0.4, 0.4, 0.4) and r.views.local.augment.std == r.views.augment[0].std
    assert r.views.local.augment.crop_scale == (0.05, 0.32)  # its own crops: DINOv2's local scale
    with pytest.raises(ConfigError, match=r"views.local.augment.std: the local crops are normalised as the global "
                                          r"views, \[0.5, 0.5, 0.5\], got \[0.2, 0.2, 0.2\]"):
        load_recipe("simclr", overrides=["views.local={count: 2, size: 16, augment: {std: [0.2, 0.2, 0.2]}}"])
    with pytest.raises(ConfigError, match=r"terms.0.target.view: term 'view' uses view 2 but the recipe has 2"):
        load_recipe("simclr", overrides=["terms.0.target.view=2"])


def test_the_memory_check_counts_the_local_crops(monkeypatch):
    seen = []
    monkeypatch.setattr(preflight.memory, "require", lambda need, device, what: seen.append((need, what)))
    r = load_recipe("simclr", overrides=LOCAL)
    preflight.check_memory(r, torch.device("cpu"), 1)
    # uint8 images + float views: 2 global views of 32², 2 local crops of 16²
    assert seen[0][0] == B * 3 * (32 ** 2 + 4 * (2 * 32 ** 2 + 2 * 16 ** 2))
    assert "2 view(s) + 2 local crop(s) at 16 px" in seen[0][1]


def test_decode_side_covers_the_smallest_local_crop():
    """A JPEG draft is no smaller than the local crops need when theirs is the smallest crop."""
    obj = objective("views.local={count: 2, size: 16, augment: {crop_scale: [0.001, 0.01]}}")
    side = obj.loader_views(0).side
    aug = obj.recipe.views.local.augment
    short = math.sqrt(aug.crop_scale[0] / max(aug.crop_ratio[1], 1 / aug.crop_ratio[0]))
    assert side * short >= 16 > (side - 1) * short
