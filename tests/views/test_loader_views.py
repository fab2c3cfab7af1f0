"""Views made in the loader: cut from the decoded original (its own size, aspect ratio and detail),
every random parameter from the step's generator, the same through DataLoader workers."""
from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from m3i.batch import Drawn
from m3i.config import load_recipe
from m3i.data import ImageFolder, Mixture
from m3i.objective import Objective
from m3i.views import LoaderViews, ViewAugment, crop_boxes, crop_view
from m3i.views.loader import decode_side


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def neighbour_diff(a: np.ndarray) -> float:
    """Mean absolute difference of horizontally adjacent pixels: how much fine detail survives."""
    a = a.astype(np.float64)
    return float(np.abs(a[:, 1:] - a[:, :-1]).mean())


def views_for(augments, cfg_recipe="simclr", **kw) -> LoaderViews:
    recipe = load_recipe(cfg_recipe)
    return LoaderViews(augments, recipe.views, (8, 8), [], **kw)


def test_a_small_crop_of_a_1024_px_source_keeps_its_full_detail():
    src = noise(1024, 1024)
    aug = ViewAugment(size=224, crop_scale=(0.05, 0.05), crop_ratio=(1.0, 1.0), flip_p=0.0)
    crops, drawn = views_for([aug])([src], step=3)
    i, j, h, w = drawn.views[0]["box"][0].tolist()
    side = round(math.sqrt(0.05) * 1024)  # 229 source pixels across
    assert (h, w) == (side, side) and 0 <= i <= 1024 - side and 0 <= j <= 1024 - side
    view = crops[0][0].permute(1, 2, 0).numpy()
    region = np.asarray(src)[int(i):int(i + h), int(j):int(j + w)]
    # 229 -> 224 px keeps most of the source's pixel-to-pixel detail (resampling mixes neighbours) ...
    assert neighbour_diff(view) > 0.6 * neighbour_diff(region)
    # ... where cutting it from the image first shrunk to a 224-px square, as before, smears it
    square = src.resize((224, 224), Image.Resampling.BICUBIC)
    s = 224 / 1024
    old = square.resize((224, 224), Image.Resampling.BICUBIC, box=(j * s, i * s, (j + w) * s, (i + h) * s))
    assert neighbour_diff(np.asarray(old)) < 0.1 * neighbour_diff(region)
    # and it is the region resized, independently computed
    ref = np.asarray(Image.fromarray(region).resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float64)
    assert np.abs(view.astype(np.float64) - ref).mean() < 2.0


def test_crops_keep_the_source_aspect_ratio():
    """A square crop of a 2:1 photo is a square of it, not a square of the photo squashed."""
    src = noise(1024, 512, seed=1)
    aug = ViewAugment(size=32, crop_scale=(0.5, 0.5), crop_ratio=(1.0, 1.0), flip_p=0.0)
    _, drawn = views_for([aug])([src], step=0)
    i, j, h, w = drawn.views[0]["box"][0].tolist()
    assert (i, h, w) == (0, 512, 512) and 0 <= j <= 512


def test_a_flipped_view_is_the_mirrored_crop():
    src = noise(64, 48, seed=2)
    box = (5.0, 7.0, 30.0, 40.0)
    plain = crop_view(src, box, False, (16, 16))
    assert np.array_equal(crop_view(src, box, True, (16, 16)), plain[:, ::-1])


def test_crop_boxes_are_the_random_resized_crop_of_each_image():
    g = torch.Generator().manual_seed(0)
    n = 4000
    heights = torch.randint(100, 400, (n,), generator=g)  # aspect ratios 1/4 … 4
    widths = torch.randint(100, 400, (n,), generator=g)
    b = crop_boxes(heights, widths, (0.1, 0.5), (3 / 4, 4 / 3), generator=g)
    i, j, h, w = b.unbind(1)
    assert torch.all(b == b.round()) and torch.all((i >= 0) & (j >= 0) & (h >= 1) & (w >= 1))
    assert torch.all((i + h <= heights) & (j + w <= widths))
    frac = h * w / (heights * widths)
    assert torch.all((frac > 0.1 * 0.95) & (frac < 0.5 * 1.05))  # the area range, up to whole pixels
    big = (heights > 200) & (widths > 200)  # where rounding is small
    assert abs(frac[big].mean().item() - 0.3) < 0.01  # uniform in the area range
    aspect = w / h
    assert torch.all((aspect[big] > 0.75 * 0.97) & (aspect[big] < 4 / 3 * 1.03))
    # no try can fit (the whole area as a square of a 2:1 image): the centred largest square
    one = crop_boxes(torch.tensor([50]), torch.tensor([100]), (1.0, 1.0), (1.0, 1.0))
    assert one.tolist() == [[0.0, 25.0, 50.0, 50.0]]
    tall = crop_boxes(torch.tensor([100]), torch.tensor([50]), (1.0, 1.0), (1.0, 1.0))
    assert tall.tolist() == [[25.0, 0.0, 50.0, 50.0]]


def test_decode_side_covers_the_smallest_crop():
    aug = ViewAugment(size=224, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3))
    side = decode_side([aug])
    # the smallest crop's short side: sqrt(0.08 / (4/3)) of the image's side
    assert side * math.sqrt(0.08 / (4 / 3)) >= 224 > (side - 1) * math.sqrt(0.08 / (4 / 3))


@pytest.fixture
def photos(tmp_path) -> ImageFolder:
    for k, name in enumerate(["a", "b"]):
        for m in range(6):
            (tmp_path / name).mkdir(exist_ok=True)
            noise(40 + 9 * m, 30 + 7 * k, seed=10 * k + m).save(tmp_path / name / f"{m}.png")
    return ImageFolder(tmp_path)


def mixture_with_views(src, recipe="sim", seed=0) -> tuple[Mixture, Objective]:
    r = load_recipe(recipe, overrides=["data.batch_size=4", "backbone.name=vit_nano", "backbone.depth=1"])
    obj = Objective(r, num_classes=2)
    mix = Mixture([src], None, batch_size=4, image_size=32, seed=seed, num_steps=6)
    mix.views = obj.loader_views(seed)
    return mix, obj


def same(a, b) -> bool:
    if isinstance(a, Drawn):
        return isinstance(b, Drawn) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in fields(Drawn))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_views_are_a_function_of_the_step_through_workers_too(photos):
    mix, obj = mixture_with_views(photos)
    direct = [mix.batch(s) for s in range(6)]
    assert direct[0].images is None and len(direct[0].crops) == obj.recipe.views.count
    assert direct[0].crops[0].shape == (4, 3, 32, 32) and direct[0].crops[0].dtype == torch.uint8
    assert set(direct[0].drawn.visible) == set(obj.masked_views())
    again = mix.batch(4)
    assert same(again.crops, direct[4].crops) and same(again.drawn, direct[4].drawn)
    assert not torch.equal(direct[1].crops[0], direct[2].crops[0])
    loaded = list(DataLoader(mix, batch_size=None, num_workers=2))
    for a, b in zip(direct, loaded):
        assert same(a.crops, b.crops) and same(a.drawn, b.drawn)
    other_rank = obj.loader_views(0, rank=1)
    assert other_rank.generator(0).initial_seed() != mix.views.generator(0).initial_seed()


def test_the_loaders_views_run_through_the_objective(photos):
    """A loader batch stages and trains: the device runs the colour steps on the crops, the
    boxes are those of each original (SIM's relative positions read them)."""
    mix, obj = mixture_with_views(photos)
    batch = obj.stage(mix.batch(0), torch.device("cpu"))
    views = obj.views_of(batch)
    assert [v.shape for v in views.images] == [(4, 3, 32, 32)] * obj.recipe.views.count
    sizes = torch.tensor([[photos.get(int(i))["image"].height, photos.get(int(i))["image"].width]
                          for i in batch.index])
    for box in views.boxes:
        assert torch.all(box[:, 0] + box[:, 2] <= sizes[:, 0]) and torch.all(box[:, 1] + box[:, 3] <= sizes[:, 1])
    out = obj(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
