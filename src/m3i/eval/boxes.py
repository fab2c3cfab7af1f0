"""Detection ground truth on the dense scenes, LVIS's frequency bins, and the COCO / LVIS evaluator.

A box is the tight extent of an item's *visible* pixels (what is left of it after the items pasted
over it), in pixel edges ``[x0, y0, x1, y1]``; its area, as in COCO, is the number of those pixels.
An item that later items hide entirely has no box.

Scores come from ``faster-coco-eval`` (COCO's ``COCOeval`` in C++) with ``lvis_style=True``: every
class a canvas does not hold is listed as a verified negative of that canvas, so the federated LVIS
protocol reduces to COCO's exhaustive one (the scenes are labelled exhaustively), and the same call
gives AP, AP50, AP75, AP small / medium / large and AP_r / AP_c / AP_f.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.scenes import SCENE_DATASETS, make_scenes

DETECTION_DATASETS = ("fashion-mnist-scenes", "emoji-scenes", "emoji-scenes:category", "emoji-scenes:subcategory")
# COCO's size ranges (32², 96² pixels on ~640-pixel images) cut its objects about 41 / 34 / 24 %;
# on the 64-pixel canvases they would leave nothing large, so the sides are 16 and 24 pixels
AREA_RANGES = {"small": [0, 16 ** 2], "medium": [16 ** 2, 24 ** 2], "large": [24 ** 2, 1e10]}
# LVIS: rare 1–10, common 11–100, frequent > 100 of ~100k training images. Its counts scaled
# linearly to 3,000 canvases would be 0.3 and 3 (every class frequent), so the bins are shares of
# the training canvases, chosen once so that the full emoji-scenes:subcategory train split holds
# LVIS v1's shares of classes (337 / 461 / 405 of 1,203: 28 / 38 / 34 %): rare in at most 1.2 % of
# the canvases (36 of 3,000), common in at most 2.9 % (87), frequent in more
RARE_SHARE, COMMON_SHARE = 0.012, 0.029
MAX_DETECTIONS = 100  # per canvas, as COCO's AP; LVIS allows 300 per image, a canvas holds at most 4 items
METRIC_NAMES = {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "AP_small": "AP_small", "AP_medium": "AP_medium",
                "AP_large": "AP_large", "AP_r": "APr", "AP_c": "APc", "AP_f": "APf", "AR100": "AR_third"}


@dataclass
class DetectionSet:
    """Canvases and their true boxes.

    images: (N, 3, S, S) uint8.
    boxes:  per canvas, (k, 4) float ``[x0, y0, x1, y1]`` pixel edges of its visible items.
    labels: per canvas, (k,) int64 class indices into ``classes``.
    areas:  per canvas, (k,) int64 visible pixels of each item.
    hidden: items with no visible pixel (no box).
    """

    name: str
    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    areas: list[Tensor]
    classes: list[str]
    hidden: int

    def __len__(self) -> int:
        return len(self.images)


def parse_dataset(dataset: str) -> tuple[str, str]:
    """``emoji-scenes:subcategory`` -> (``emoji-scenes``, ``subcategory``); one line for anything else."""
    base, _, label = dataset.partition(":")
    ok = base in SCENE_DATASETS and (label == "" or (base == "emoji-scenes" and label in ("category", "subcategory")))
    if not ok:
        raise ValueError(f"--task detection needs a scene data set: --dataset {dataset!r}, expected one of "
                         f"{', '.join(DETECTION_DATASETS)}")
    return base, label or "category"


def visible_boxes(instances: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """(S, S) map of which item (j + 1) each pixel shows -> the boxes (k, 4), item indices (k,) and
    visible pixels (k,) of the ``count`` items that are at least partly visible, in paste order."""
    boxes, kept, areas = [], [], []
    for j in range(count):
        ys, xs = (instances == j + 1).nonzero(as_tuple=True)
        if len(ys):
            boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
            kept.append(j)
            areas.append(len(ys))
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(kept, dtype=torch.int64),
            torch.tensor(areas, dtype=torch.int64))


def _subcategory_of(split: str) -> tuple[dict[str, int], list[str]]:
    from ..data.emoji import Emoji

    src = Emoji(label="subcategory", split=split)
    return dict(zip(src.files, src.targets.tolist())), list(src.class_names)


def scene_detections(dataset: str, split: str, n: int | None = None, seed: int = 0) -> DetectionSet:
    """The first ``n`` canvases of a scene data set's ``split`` with their boxes; ``emoji-scenes``
    labels its items by category (10 classes) or, with ``:subcategory``, by subcategory (99)."""
    base, label = parse_dataset(dataset)
    scenes = make_scenes(base, split, n, seed)
    sub, sub_classes = _subcategory_of(split) if label == "subcategory" else ({}, [])
    boxes, labels, areas, hidden = [], [], [], 0
    for i in range(len(scenes)):
        b, kept, a = visible_boxes(scenes.instances[i], len(scenes.items[i]))
        if sub:
            y = [sub[scenes.items[i][j]] for j in kept.tolist()]
        else:  # the label map holds class + 1 wherever the item is visible
            y = [int(scenes.masks[i][scenes.instances[i] == j + 1][0]) - 1 for j in kept.tolist()]
        boxes.append(b)
        labels.append(torch.tensor(y, dtype=torch.int64))
        areas.append(a)
        hidden += len(scenes.items[i]) - len(kept)
    classes = sub_classes or scenes.classes[1:]
    return DetectionSet(f"{dataset}:{split}", scenes.images, boxes, labels, areas, classes, hidden)


# ------------------------------------------------------------------ LVIS's frequency bins


def frequency_bins(train: DetectionSet) -> dict:
    """Each class's number of training canvases that show it, and its LVIS bin (``r``, ``c``, ``f``)."""
    counts = torch.zeros(len(train.classes), dtype=torch.int64)
    for y in train.labels:
        counts[y.unique()] += 1
    rare, common = int(RARE_SHARE * len(train)), int(COMMON_SHARE * len(train))
    bins = ["r" if c <= rare else "c" if c <= common else "f" for c in counts.tolist()]
    return {"rule": f"training canvases showing the class: rare <= {RARE_SHARE:.1%}, common <= {COMMON_SHARE:.1%} "
                    f"of {len(train)}, frequent above",
            "rare_max": rare, "common_max": common, "canvases": dict(zip(train.classes, counts.tolist())),
            "bin": dict(zip(train.classes, bins)), "classes_per_bin": {b: bins.count(b) for b in "rcf"}}


# ------------------------------------------------------------------ the evaluator


def coco_ground_truth(truth: DetectionSet, bins: list[str]) -> dict:
    """The COCO / LVIS annotation dict: every class a canvas lacks is a verified negative there."""
    side = int(truth.images.shape[-1])
    images, annotations = [], []
    for i, (b, y, a) in enumerate(zip(truth.boxes, truth.labels, truth.areas)):
        present = set(y.tolist())
        images.append({"id": i + 1, "width": side, "height": side, "not_exhaustive_category_ids": [],
                       "neg_category_ids": [c + 1 for c in range(len(truth.classes)) if c not in present]})
        for box, c, area in zip(b.tolist(), y.tolist(), a.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": c + 1, "iscrowd": 0,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "area": area})
    categories = [{"id": c + 1, "name": name, "frequency": f} for c, (name, f) in enumerate(zip(truth.classes, bins))]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_detections(detections: list[tuple[Tensor, Tensor, Tensor]]) -> list[dict]:
    """Per canvas (boxes (k, 4) xyxy, scores (k,), labels (k,)) -> COCO's result list."""
    out = []
    for i, (b, s, y) in enumerate(detections):
        for box, score, c in zip(b.tolist(), s.tolist(), y.tolist()):
            out.append({"image_id": i + 1, "category_id": int(c) + 1, "score": float(score),
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    return out


def box_ap(truth: DetectionSet, detections: list[tuple[Tensor, Tensor, Tensor]], bins: list[str]) -> dict:
    """COCO's and LVIS's box AP of ``detections`` (one entry per canvas of ``truth``), in [0, 1];
    None where no class of a group (a size range, a frequency bin) has a true box."""
    from faster_coco_eval import COCO, COCOeval_faster

    quiet = lambda *a, **k: None
    gt = COCO(coco_ground_truth(truth, bins), print_function=quiet)
    dt = gt.loadRes(coco_detections(detections))
    ev = COCOeval_faster(gt, dt, iouType="bbox", ranges=AREA_RANGES, lvis_style=True, print_function=quiet)
    ev.params.maxDets = [1, 10, MAX_DETECTIONS]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = ev.stats_as_dict
    return {name: (None if stats[key] < 0 else float(stats[key])) for name, key in METRIC_NAMES.items()}
