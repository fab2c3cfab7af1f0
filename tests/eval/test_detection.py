"""Detection: the boxes of the scenes, the CenterNet head's targets and decoding, the COCO / LVIS
evaluator against hand-computed cases, and ``m3i eval --task detection`` end to end."""
import json
import math

import pytest
import torch

from conftest import needs_data
from m3i.eval.boxes import DetectionSet, box_ap, frequency_bins, visible_boxes
from m3i.eval.centernet import GAUSS_ALPHA, center_targets, decode

# ------------------------------------------------------------------ boxes


def test_a_box_is_the_extent_of_the_visible_pixels_and_a_hidden_item_has_none():
    inst = torch.zeros(8, 8, dtype=torch.uint8)
    inst[1:5, 1:5] = 1  # item 0: a 4 × 4 square ...
    inst[1:5, 3:7] = 2  # ... whose right half item 1 covers: 2 columns of it are left
    # item 2 was pasted first and item 0 and 1 over all of it: no pixel shows it
    boxes, kept, areas = visible_boxes(inst, 3)
    assert boxes.tolist() == [[1, 1, 3, 5], [3, 1, 7, 5]]  # [x0, y0, x1, y1] pixel edges
    assert kept.tolist() == [0, 1] and areas.tolist() == [8, 16]


@needs_data
@pytest.mark.parametrize("dataset", ["fashion-mnist-scenes", "emoji-scenes"])
def test_scene_boxes_are_tight_around_the_pixels_the_label_map_shows(dataset):
    from m3i.data.scenes import make_scenes
    from m3i.eval.boxes import scene_detections

    scenes, det = make_scenes(dataset, "test", 30), scene_detections(dataset, "test", 30)
    assert det.hidden + sum(len(b) for b in det.boxes) == sum(len(it) for it in scenes.items)
    for i in range(30):
        assert torch.equal(scenes.instances[i] > 0, scenes.masks[i] > 0)  # one owner for every labelled pixel
        for (x0, y0, x1, y1), y, a in zip(det.boxes[i].long().tolist(), det.labels[i].tolist(), det.areas[i].tolist()):
            inside = torch.zeros_like(scenes.masks[i], dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            region = scenes.masks[i][inside]
            assert (region == y + 1).sum() >= a > 0  # the item's class fills at least its own pixels
            # tight: every edge row and column of the box holds a pixel of that class
            for edge in (scenes.masks[i][y0, x0:x1], scenes.masks[i][y1 - 1, x0:x1],
                         scenes.masks[i][y0:y1, x0], scenes.masks[i][y0:y1, x1 - 1]):
                assert (edge == y + 1).any()


@needs_data
def test_subcategory_labels_agree_with_the_category_the_label_map_paints():
    from m3i.eval.boxes import scene_detections

    sub, cat = scene_detections("emoji-scenes:subcategory", "train", 200), scene_detections("emoji-scenes", "train", 200)
    assert len(sub.classes) == 99 and len(cat.classes) == 10
    parent: dict[int, int] = {}
    for ys, yc in zip(sub.labels, cat.labels):
        for s, c in zip(ys.tolist(), yc.tolist()):
            assert parent.setdefault(s, c) == c  # a subcategory lies inside one category
    assert len(parent) > 40


def test_frequency_bins_scale_lvis_to_the_number_of_training_canvases():
    # 1,000 canvases: rare <= 12 canvases (1.2 %), common <= 29 (2.9 %), frequent above
    shown = {0: 5, 1: 12, 2: 13, 3: 29, 4: 30, 5: 1000}
    labels = [torch.tensor([c for c, n in shown.items() if i < n]) for i in range(1000)]
    train = DetectionSet("t", torch.zeros(1000, 3, 8, 8, dtype=torch.uint8), [torch.zeros(len(y), 4) for y in labels],
                         labels, [torch.ones(len(y), dtype=torch.int64) for y in labels], list("abcdef"), 0)
    bins = frequency_bins(train)
    assert (bins["rare_max"], bins["common_max"]) == (12, 29)
    assert list(bins["bin"].values()) == ["r", "r", "c", "c", "f", "f"]
    assert bins["canvases"] == dict(zip("abcdef", shown.values()))


# ------------------------------------------------------------------ the head


def test_targets_put_a_unit_peak_at_the_centre_cell_with_size_and_offset_in_cells():
    boxes = torch.tensor([[[8.0, 12.0, 28.0, 32.0], [0, 0, 0, 0]]])  # centre (18, 22) px = (4.5, 5.5) cells
    t = center_targets(boxes, torch.tensor([[2, 0]]), torch.tensor([[True, False]]), num_classes=3, grid=16)
    assert t["index"][0, 0].item() == 5 * 16 + 4
    assert t["size"][0, 0].tolist() == [5.0, 5.0] and t["offset"][0, 0].tolist() == [0.5, 0.5]
    heat = t["heat"][0]
    assert heat[2, 5, 4].item() == 1.0 and heat[:2].abs().sum() == 0  # the padded object draws nothing
    sigma = GAUSS_ALPHA * 5 / 6
    assert heat[2, 5, 5].item() == pytest.approx(math.exp(-1 / (2 * sigma ** 2)), rel=1e-5)
    assert heat[2, 6, 5].item() == pytest.approx(math.exp(-2 / (2 * sigma ** 2)), rel=1e-4)


def test_decoding_ideal_outputs_gives_back_the_true_boxes():
    boxes = torch.tensor([[[8.0, 12.0, 28.0, 32.0], [30.0, 2.0, 61.0, 25.0]], [[40.0, 40.0, 64.0, 60.0], [0, 0, 0, 0]]])
    labels, valid = torch.tensor([[2, 0], [1, 0]]), torch.tensor([[True, True], [True, False]])
    t = center_targets(boxes, labels, valid, num_classes=3, grid=16)
    logits = torch.where(t["heat"] == 1, 8.0, -8.0)
    size, offset = torch.zeros(2, 2, 16, 16), torch.zeros(2, 2, 16, 16)
    for b in range(2):
        for m in range(2):
            if valid[b, m]:
                y, x = divmod(t["index"][b, m].item(), 16)
                size[b, :, y, x], offset[b, :, y, x] = t["size"][b, m], t["offset"][b, m]
    out = decode((logits, size, offset), k=5, canvas=64)
    for b, n in enumerate(valid.sum(1).tolist()):
        got_boxes, scores, got_labels = out[b]
        assert len(scores) == 5 and scores[n - 1] > 0.99 > 0.01 > scores[n]  # the true peaks first, then nothing
        order = sorted(range(n), key=lambda m: got_labels[m].item())
        want = sorted(range(n), key=lambda m: labels[b, m].item())
        assert torch.allclose(got_boxes[order], boxes[b, want], atol=1e-5)


# ------------------------------------------------------------------ the evaluator


def _truth() -> DetectionSet:
    """Four canvases, three classes: a (rare), b (common), c (frequent)."""
    boxes = [torch.tensor([[2.0, 2.0, 22.0, 22.0], [30.0, 30.0, 55.0, 60.0]]), torch.tensor([[10.0, 5.0, 40.0, 25.0]]),
             torch.tensor([[0.0, 0.0, 30.0, 30.0], [33.0, 10.0, 63.0, 40.0]]), torch.tensor([[5.0, 40.0, 25.0, 60.0]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([2, 1]), torch.tensor([2])]
    areas = [((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).long() for b in boxes]
    return DetectionSet("hand", torch.zeros(4, 3, 64, 64, dtype=torch.uint8), boxes, labels, areas, list("abc"), 0)


BINS = ["r", "c", "f"]


def _detect(truth, shift=0.0, drop=()):
    """The true boxes as detections (score 1), moved right by ``shift`` × their width; classes in ``drop`` missed."""
    out = []
    for b, y in zip(truth.boxes, truth.labels):
        keep = torch.tensor([c not in drop for c in y.tolist()], dtype=torch.bool)
        moved = b.clone()
        moved[:, [0, 2]] += shift * (b[:, 2] - b[:, 0])[:, None]
        out.append((moved[keep], torch.ones(int(keep.sum())), y[keep]))
    return out


def test_perfect_detections_score_one_everywhere():
    m = box_ap(_truth(), _detect(_truth()), BINS)
    assert all(v == 1.0 for v in m.values() if v is not None)
    assert m["AP"] == m["AP_r"] == m["AP_c"] == m["AP_f"] == 1.0


def test_boxes_at_iou_two_thirds_pass_the_thresholds_below_it_only():
    # a box moved by a fifth of its width: IoU = (w − w/5) / (w + w/5) = 2/3, above 0.50 … 0.65, below 0.70 … 0.95
    m = box_ap(_truth(), _detect(_truth(), shift=0.2), BINS)
    assert m["AP50"] == 1.0 and m["AP75"] == 0.0
    assert m["AP"] == pytest.approx(0.4)  # 4 of the 10 thresholds
    assert m["AP_r"] == m["AP_c"] == m["AP_f"] == pytest.approx(0.4)


def test_a_missed_rare_class_moves_ap_r_alone():
    m = box_ap(_truth(), _detect(_truth(), drop={0}), BINS)
    assert m["AP_r"] == 0.0 and m["AP_c"] == 1.0 and m["AP_f"] == 1.0
    assert m["AP"] == pytest.approx(2 / 3)  # the mean over the three classes


def test_a_false_detection_of_a_class_the_canvas_lacks_counts():
    # LVIS's federated rule drops detections of classes not verified absent; every absent class is
    # listed as verified absent, so the false box counts as in COCO
    truth = _truth()
    detections = _detect(truth)
    b, s, y = detections[1]  # canvas 1 holds only b; a confident false "a" box there
    detections[1] = (torch.cat([b, torch.tensor([[0.0, 30.0, 20.0, 50.0]])]), torch.cat([s, torch.tensor([2.0])]),
                     torch.cat([y, torch.tensor([0])]))
    m = box_ap(truth, detections, BINS)
    assert m["AP_r"] < 1.0 and m["AP_c"] == m["AP_f"] == 1.0


def test_size_ranges_follow_the_visible_area():
    m = box_ap(_truth(), _detect(_truth()), BINS)
    assert m["AP_small"] is None  # no true box under 16² pixels here
    assert m["AP_medium"] == m["AP_large"] == 1.0


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize("args, words", [
    (["pixels", "--dataset", "fashion-mnist"], ["--dataset", "emoji-scenes:subcategory"]),
    (["pixels", "--dataset", "fashion-mnist-scenes:subcategory"], ["fashion-mnist-scenes:subcategory"]),
    (["pixels", "--dataset", "emoji-scenes", "--setting", "finetuned"], ["pixels", "no backbone to fine-tune"]),
    (["pixels", "--dataset", "emoji-scenes", "--recipe", "m3i"], ["--recipe", "scratch"]),
    (["scratch", "--dataset", "emoji-scenes", "--recipe", "nope"], ["unknown recipe 'nope'"]),
])
def test_detection_mistakes_are_one_line_and_exit_2(capsys, args, words):
    from m3i.cli import main

    assert main(["eval", "--task", "detection", "--checkpoint", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert all(w in err for w in words), err


def test_detection_options_on_another_task_are_refused(capsys):
    from m3i.cli import main

    assert main(["eval", "--checkpoint", "pixels", "--task", "knn", "--dataset", "digits", "--steps", "3"]) == 2
    assert "options of --task detection" in capsys.readouterr().err


@needs_data
@pytest.mark.slow
def test_eval_detection_end_to_end(tmp_path):
    from cli.clikit import TINY, run_m3i

    run = tmp_path / "run"
    done = run_m3i("pretrain", "--recipe", TINY, "--out", str(run), "--steps", "1", "--no-progress", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    small = ["--task", "detection", "--limit", "40", "--steps", "2", "--no-progress", "--device", "cpu"]
    for ck, extra, settings in [(str(run), [], ["frozen", "finetuned"]), ("pixels", [], ["frozen"]),
                                ("scratch", ["--recipe", str(run)], ["finetuned"])]:
        out = tmp_path / f"{ck.replace('/', '_')}.json"
        done = run_m3i("eval", "--checkpoint", ck, "--dataset", "emoji-scenes:subcategory", "--json", str(out),
                       *small, *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        r = json.loads(out.read_text())
        assert r["task"] == "detection" and list(r["metrics"]) == settings
        assert (r["n_train"], r["n_test"], r["classes"], r["head"]["steps"]) == (40, 10, 99, 2)
        for m in r["metrics"].values():
            assert set(m) == {"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AP_r", "AP_c", "AP_f",
                              "AR100"}
            assert all(v is None or 0.0 <= v <= 1.0 for v in m.values())
        assert sum(r["frequency"]["classes_per_bin"].values()) == 99
        assert r["backbone"] == (None if ck == "pixels" else "vit_nano")
        assert r["settings"][settings[0]]["feature_grid"] == ([8, 8] if ck == "pixels" else [16, 16])
        png = tmp_path / f"{ck.replace('/', '_')}.boxes.png"
        assert r["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "detection on emoji-scenes:subcategory" in done.stdout


@needs_data
def test_the_comparison_fills_its_detection_columns():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from compare import DETECTION, detection_columns, settings

    a = settings(["--detection", "--detection-steps", "1", "--detection-limit", "12", "--split", "val"])
    columns = {f"{c}_{s}" for c in DETECTION for s in ("frozen", "finetuned")}
    pixels = detection_columns("pixels", a, "resnet")
    assert set(pixels) == columns
    assert all(pixels[f"{c}_finetuned"] == pixels[f"{c}_frozen"] for c in DETECTION)  # one run stands for both
    scratch = detection_columns("scratch", a, "resnet")
    assert set(scratch) == columns and all(scratch[f"{c}_frozen"] is None for c in DETECTION)
    assert all(0.0 <= scratch[f"{c}_finetuned"] <= 1.0 for c in DETECTION if scratch[f"{c}_finetuned"] is not None)
