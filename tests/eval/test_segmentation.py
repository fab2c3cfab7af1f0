"""Tests for the linear segmentation probe: the metric, the head's fit, controls, the CLI."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_data
from m3i.eval.segmentation import (
    confusion_matrix,
    fit_probe,
    linear_segmentation,
    pixel_patches,
    sample_pixels,
    segmentation_metrics,
    segmentation_score,
    upsampled_at,
)


def test_miou_matches_a_hand_computed_example():
    truth = torch.tensor([[0, 0, 1, 1],
                          [0, 0, 1, 1],
                          [2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 0, 1, 0],
                         [2, 2, 3, 2]])
    # class 0: TP 3, FP 1 (row 1, col 3), FN 1 (row 0, col 1) -> 3/5
    # class 1: TP 3, FP 1 (row 0, col 1), FN 1 (row 1, col 3) -> 3/5
    # class 2: TP 3, FP 0, FN 1 -> 3/4
    # class 3: TP 0, FP 1 (predicted, never true) -> 0;  class 4: absent from both -> left out
    m = segmentation_metrics(confusion_matrix(pred, truth, 5))
    assert m["mIoU"] == pytest.approx((0.6 + 0.6 + 0.75 + 0.0) / 4)
    assert m["pixel_acc"] == pytest.approx(9 / 12)


def test_upsampled_at_reads_the_bilinear_upsampling():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 5, 8, 8, generator=g)
    ys, xs = torch.randint(0, 64, (3, 50), generator=g), torch.randint(0, 64, (3, 50), generator=g)
    ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1] = 0, 0, 63, 63  # the borders too
    full = F.interpolate(feats, size=(64, 64), mode="bilinear", align_corners=False)
    expect = full[torch.arange(3)[:, None], :, ys, xs]  # (3, 50, 5)
    torch.testing.assert_close(upsampled_at(feats, ys, xs, (64, 64)), expect)


def test_pixel_patches_cut_the_canvas_like_unfold():
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor([0.2, 0.4, 0.5]), torch.tensor([0.3, 0.2, 0.1])
    x = (img.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(pixel_patches(img, mean, std, 8), F.unfold(x, 8, stride=8).reshape(2, 192, 4, 4))


def test_fitted_head_is_the_regression_it_was_trained_as():
    """The head's full-resolution logits at a pixel equal the fitted linear map of that pixel's
    standardised upsampled feature: BatchNorm and upsampling commute as the fit assumes."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(6, 4, 4, 4, generator=g) * 3 + 1
    masks = torch.randint(0, 3, (6, 16, 16), generator=g)
    head = fit_probe(feats, masks, 3, pixels_per_canvas=20)
    x, _ = sample_pixels(feats, masks, 20)
    flat = feats.transpose(0, 1).reshape(4, -1)
    z = (x - flat.mean(1)) / (flat.var(1, unbiased=False) + head.bn.eps).sqrt()
    direct = z @ head.conv.weight[:, :, 0, 0].t() + head.conv.bias
    gen = torch.Generator().manual_seed(0)  # sample_pixels' own draw
    ys, xs = torch.randint(0, 16, (6, 20), generator=gen), torch.randint(0, 16, (6, 20), generator=gen)
    with torch.no_grad():
        logits = head(feats, (16, 16))  # (6, 3, 16, 16)
    torch.testing.assert_close(logits[torch.arange(6)[:, None], :, ys, xs].reshape(-1, 3), direct,
                               atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- controls on real scenes


@pytest.fixture(scope="module")
def scenes():
    from m3i.data.scenes import make_scenes

    return make_scenes("fashion-mnist-scenes", "train", 400), make_scenes("fashion-mnist-scenes", "test", 100)


def majority_miou(masks, num_classes):
    """What predicting background everywhere scores: the chance level of this data."""
    return segmentation_metrics(confusion_matrix(torch.zeros_like(masks), masks, num_classes))


def oracle_features(masks, stride=4, noise=0.3, seed=0):
    """One-hot of the true class covering most of each stride×stride patch, plus noise."""
    one_hot = F.one_hot(masks, 11).permute(0, 3, 1, 2).float()
    share = F.avg_pool2d(one_hot, stride)
    g = torch.Generator().manual_seed(seed)
    return F.one_hot(share.argmax(1), 11).permute(0, 3, 1, 2).float() + noise * torch.randn(share.shape, generator=g)


@needs_data
def test_positive_control_features_that_know_the_class_reach_miou_near_one(scenes):
    tr, te = scenes
    m, iou = linear_segmentation(oracle_features(tr.masks, 1, 0.1), tr.masks, oracle_features(te.masks, 1, 0.1, 1),
                                 te.masks, tr.classes)
    assert m["mIoU"] > 0.97 and m["pixel_acc"] > 0.99
    assert set(iou) == set(tr.classes)


@needs_data
def test_positive_control_per_patch_reaches_the_resolution_ceiling(scenes):
    """At 4×4 patches the best a per-patch answer can do is the true patch majority blown up to
    its pixels; the probe gets there (bilinear upsampling may even do a little better)."""
    tr, te = scenes
    majority = F.avg_pool2d(F.one_hot(te.masks, 11).permute(0, 3, 1, 2).float(), 4).argmax(1)
    ceiling = segmentation_metrics(confusion_matrix(majority.repeat_interleave(4, 1).repeat_interleave(4, 2),
                                                    te.masks, 11))
    m, _ = linear_segmentation(oracle_features(tr.masks), tr.masks, oracle_features(te.masks, seed=1), te.masks,
                               tr.classes)
    assert 0.6 < ceiling["mIoU"] < 0.9  # 4×4 patches cannot draw thin item outlines
    assert m["mIoU"] > ceiling["mIoU"] - 0.06 and m["pixel_acc"] > ceiling["pixel_acc"] - 0.02


@needs_data
def test_negative_control_random_features_stay_at_chance(scenes):
    tr, te = scenes
    g = torch.Generator().manual_seed(2)
    m, _ = linear_segmentation(torch.randn(len(tr), 32, 16, 16, generator=g), tr.masks,
                               torch.randn(len(te), 32, 16, 16, generator=g), te.masks, tr.classes)
    chance = majority_miou(te.masks, 11)
    assert m["mIoU"] < chance["mIoU"] + 0.02
    assert m["pixel_acc"] < chance["pixel_acc"] + 0.01


@needs_data
def test_raw_pixels_beat_chance(scenes):
    r = segmentation_score("pixels", "fashion-mnist-scenes", limit=400)
    assert (r["n_train"], r["n_test"], r["canvas"], r["feature_grid"]) == (400, 100, 64, [8, 8])
    chance = majority_miou(scenes[1].masks, 11)
    assert r["metrics"]["mIoU"] > chance["mIoU"] + 0.02 and r["metrics"]["pixel_acc"] > chance["pixel_acc"]


# ---------------------------------------------------------------- command line


TINY = ["data.batch_size=8", "data.num_workers=0", "train.steps=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from m3i.config import load_recipe
    from m3i.train.loop import pretrain

    root = tmp_path_factory.mktemp("seg")
    pretrain(load_recipe("mae", overrides=TINY + ["backbone.name=vit_nano", "backbone.depth=2"]), root / "vit",
             progress=False)
    pretrain(load_recipe("mae", overrides=TINY + ["backbone.name=convnext_atto", "backbone.patch_size=8",
                                                  "views.input_mode=fill"]), root / "convnext", progress=False)
    return root


@needs_data
@pytest.mark.parametrize("which, dataset, grid", [
    ("pixels", "emoji-scenes", [8, 8]),
    ("vit", "fashion-mnist-scenes", [16, 16]),  # patch 4 on a 64-pixel canvas, trained at 32
    ("convnext", "fashion-mnist-scenes", [8, 8]),  # final stride 8
])
@pytest.mark.slow
def test_eval_segmentation_writes_the_documented_json(runs, tmp_path, which, dataset, grid):
    from m3i.cli import main

    out = tmp_path / "r.json"
    ck = "pixels" if which == "pixels" else str(runs / which)
    assert main(["eval", "--checkpoint", ck, "--task", "segmentation", "--dataset", dataset, "--limit", "80",
                 "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["task"] == "segmentation" and r["dataset"] == dataset and r["split"] == "test"
    assert set(r["metrics"]) == {"mIoU", "pixel_acc"} and r["feature_grid"] == grid
    assert 0.0 <= r["metrics"]["mIoU"] <= r["metrics"]["pixel_acc"] <= 1.0
    assert (r["n_train"], r["n_test"]) == (80, 20) and r["iou"]["background"] is not None


@needs_data
def test_segmentation_on_a_pooled_data_set_is_a_clear_error(capsys):
    from m3i.cli import main

    assert main(["eval", "--checkpoint", "pixels", "--task", "segmentation", "--dataset", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert "fashion-mnist-scenes" in err and "Traceback" not in err
