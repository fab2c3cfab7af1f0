"""Tests for the dense scene data sets: determinism, split hygiene, labels that match the items."""
import numpy as np
import pytest
import torch

from conftest import needs_data
from m3i.data import Emoji, FashionMNIST
from m3i.data.scenes import CANVAS, COUNTS, ITEMS, SCENE_DATASETS, make_scenes

pytestmark = needs_data
generate = make_scenes.__wrapped__  # bypass the cache: every call renders afresh


def item_labels(dataset: str, split: str) -> dict[str, int]:
    """Where each item of a split comes from -> its class, straight from the source."""
    src = FashionMNIST(split=split) if dataset == "fashion-mnist-scenes" else Emoji(label="category", split=split)
    return {src.locate(i): int(src.targets[i]) for i in range(len(src))}


@pytest.mark.parametrize("dataset", SCENE_DATASETS)
def test_same_arguments_same_canvases(dataset):
    a, b = generate(dataset, "test", 24), generate(dataset, "test", 24)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and a.items == b.items
    other = generate(dataset, "test", 24, seed=1)
    assert not torch.equal(a.images, other.images)
    # canvas i does not depend on how many are asked for
    assert torch.equal(generate(dataset, "test", 8).images, a.images[:8])


@pytest.mark.parametrize("dataset", SCENE_DATASETS)
def test_train_and_test_never_share_an_item(dataset):
    tr, te = make_scenes(dataset, "train"), make_scenes(dataset, "test")
    assert (len(tr), len(te)) == (COUNTS["train"], COUNTS["test"])
    seen_tr = {loc for items in tr.items for loc in items}
    seen_te = {loc for items in te.items for loc in items}
    assert not seen_tr & seen_te
    assert seen_tr <= set(item_labels(dataset, "train")) and seen_te <= set(item_labels(dataset, "test"))
    fit, val = generate(dataset, "fit", 200), generate(dataset, "val", 200)
    seen_fit = {loc for items in fit.items for loc in items}
    assert seen_fit <= set(item_labels(dataset, "train")) and not seen_fit & set(item_labels(dataset, "val"))
    assert {loc for items in val.items for loc in items} <= set(item_labels(dataset, "val"))


@pytest.mark.parametrize("dataset", SCENE_DATASETS)
def test_labels_are_the_visible_items_classes(dataset):
    s = generate(dataset, "test", 100)
    truth = item_labels(dataset, "test")
    assert s.images.shape == (100, 3, CANVAS, CANVAS) and s.images.dtype == torch.uint8
    assert s.masks.shape == (100, CANVAS, CANVAS) and s.classes[0] == "background"
    assert len(s.classes) == 11
    last_item_always_visible = 0
    for k in range(len(s)):
        items = s.items[k]
        assert ITEMS[0] <= len(items) <= ITEMS[1] and len(set(items)) == len(items)
        present = set(torch.unique(s.masks[k]).tolist()) - {0}
        assert present <= {truth[loc] + 1 for loc in items}
        last_item_always_visible += (truth[items[-1]] + 1) in present  # nothing is pasted over the last item
    assert last_item_always_visible == len(s)
    fg = s.masks > 0
    assert 0.1 < fg.float().mean() < 0.5  # items cover part of the canvas, not all of it
    if dataset == "fashion-mnist-scenes":  # gray items on black: background pixels stay black
        assert int(s.images.permute(0, 2, 3, 1)[~fg].max()) == 0
        assert float(s.images[:, 0][fg].float().mean()) > 60
    else:  # emoji on white: background pixels are (nearly) white
        assert float(s.images.permute(0, 2, 3, 1)[~fg].float().mean()) > 240


@pytest.mark.parametrize("dataset", SCENE_DATASETS)
def test_items_sit_in_their_boxes_and_overlap(dataset):
    s = generate(dataset, "test", 200)
    truth = item_labels(dataset, "test")
    overlapping = 0
    for k in range(len(s)):
        allowed = torch.zeros(len(s.classes), CANVAS, CANVAS, dtype=torch.bool)
        allowed[0] = True
        cover = torch.zeros(CANVAS, CANVAS)
        for loc, (y, x, side) in zip(s.items[k], s.boxes[k]):
            assert 0 <= y and 0 <= x and y + side <= CANVAS and x + side <= CANVAS
            allowed[truth[loc] + 1, y:y + side, x:x + side] = True
            cover[y:y + side, x:x + side] += 1
        # every labelled pixel lies in the box of an item of that class
        assert bool(allowed.gather(0, s.masks[k][None]).all())
        overlapping += bool((cover > 1).any())
    assert overlapping > len(s) // 2  # most canvases have items pasted over one another


@pytest.mark.parametrize("kwargs, match", [
    (dict(dataset="coco"), "expected one of fashion-mnist-scenes, emoji-scenes"),
    (dict(dataset="emoji-scenes", split="holdout"), "split must be one of"),
    (dict(dataset="emoji-scenes", size=48), "multiple of 32"),
    (dict(dataset="emoji-scenes", n=0), "must be positive"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(**kwargs)


def test_canvases_differ_between_splits():
    a, b = generate("emoji-scenes", "train", 4), generate("emoji-scenes", "test", 4)
    assert not np.array_equal(a.images.numpy(), b.images.numpy())
