"""Dense data sets built from real images: scenes of 2–4 items pasted on one canvas.

Each canvas holds 2–4 items drawn without replacement from one split of a built-in set, each
resized to a random side and pasted at a random place, later items over earlier ones (so items
occlude each other). The per-pixel label is the item's class + 1 where the item is visible and
0 (background) elsewhere.

- ``fashion-mnist-scenes``: Fashion-MNIST items (gray on black); an item covers the pixels where
  its resized intensity is at least ``FMNIST_THRESHOLD``.
- ``emoji-scenes``: Noto emoji alpha-composited on white; an item covers the pixels where its
  resized alpha is at least one half; the label is the emoji category.

Canvases of split ``s`` use only the items of ``fashion-mnist:s`` / ``emoji:category:s``
(:mod:`m3i.data.splits`), so test canvases never show a training item. A canvas is a pure
function of (data set, split, seed, index): the same arguments give the same pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from .emoji import Emoji
from .fashion_mnist import FashionMNIST
from .splits import SPLITS

SCENE_DATASETS = ("fashion-mnist-scenes", "emoji-scenes")
CANVAS = 64  # pixels per side: twice the recipes' 32-pixel training size
ITEMS = (2, 4)  # items per canvas, inclusive
ITEM_SIDE = (20, 40)  # side of a pasted item in pixels, inclusive
COUNTS = {"train": 3000, "fit": 3000, "test": 1000, "val": 1000}
FMNIST_THRESHOLD = 32  # of 255: fainter pixels of an item count as background
_SPLIT_CODE = {s: k for k, s in enumerate(SPLITS)}


@dataclass
class Scenes:
    """A generated dense data set.

    images: (N, 3, S, S) uint8 canvases.
    masks:  (N, S, S) int64 per-pixel labels, 0 = background, c + 1 = class c.
    items:  for each canvas, where its items come from (``Source.locate`` of each, paste order).
    boxes:  for each canvas, each item's (top, left, side) in pixels, same order.
    classes: label names, ``classes[0] == "background"``.
    instances: (N, S, S) uint8, 0 = background, k + 1 where item k (paste order) is visible.
    """

    name: str
    split: str
    images: torch.Tensor
    masks: torch.Tensor
    items: list[tuple[str, ...]]
    boxes: list[tuple[tuple[int, int, int], ...]]
    classes: list[str]
    instances: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


class _Items:
    """The item pool of one split: RGBA arrays (h, w, 4) uint8 on demand, labels, locations."""

    def __init__(self, dataset: str, split: str):
        if dataset == "fashion-mnist-scenes":
            self.src = FashionMNIST(split=split)
        else:
            self.src = Emoji(label="category", split=split)
        self.labels = np.asarray(self.src.targets, dtype=np.int64)
        self.classes = ["background"] + list(self.src.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def rgba(self, i: int) -> Image.Image:
        if isinstance(self.src, FashionMNIST):
            gray = self.src.images[i]
            alpha = np.where(gray >= FMNIST_THRESHOLD, 255, 0).astype(np.uint8)
            return Image.fromarray(np.stack([gray, gray, gray, alpha], axis=-1), "RGBA")
        with Image.open(self.src.files[i]) as im:
            return im.convert("RGBA")


def _paste(canvas: np.ndarray, mask: np.ndarray, item: Image.Image, label: int, side: int, y: int, x: int,
           binary_alpha: bool) -> np.ndarray:
    """Paint ``item`` resized to side×side at (y, x) over ``canvas`` (S, S, 3) float, label into ``mask``;
    returns the (side, side) pixels it covers."""
    rgba = np.asarray(item.resize((side, side), Image.BILINEAR), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    seen = alpha[..., 0] >= 0.5
    if binary_alpha:  # gray items on black: the item is opaque where it is seen
        alpha = seen[..., None].astype(np.float32)
    region = canvas[y:y + side, x:x + side]
    region[:] = region * (1 - alpha) + rgba[..., :3] * alpha
    mask[y:y + side, x:x + side][seen] = label
    return seen


def render_scene(pool: _Items, dataset: str, split: str, seed: int, index: int, size: int = CANVAS):
    """Canvas ``index``: (S, S, 3) uint8, (S, S) int64 labels, the items' locations and boxes, and the
    (S, S) uint8 map of which item (j + 1, paste order) each pixel shows."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    k = int(rng.integers(ITEMS[0], ITEMS[1] + 1))
    chosen = rng.choice(len(pool), size=k, replace=False)
    fmnist = dataset == "fashion-mnist-scenes"
    canvas = np.full((size, size, 3), 0.0 if fmnist else 255.0, dtype=np.float32)
    mask = np.zeros((size, size), dtype=np.int64)
    instances = np.zeros((size, size), dtype=np.uint8)
    lo, hi = (round(s * size / CANVAS) for s in ITEM_SIDE)
    boxes = []
    for j, i in enumerate(chosen):
        side = int(rng.integers(lo, hi + 1))
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        boxes.append((y, x, side))
        seen = _paste(canvas, mask, pool.rgba(int(i)), int(pool.labels[i]) + 1, side, y, x, binary_alpha=fmnist)
        instances[y:y + side, x:x + side][seen] = j + 1
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, mask, tuple(pool.src.locate(int(i)) for i in chosen), tuple(boxes), instances


@lru_cache(maxsize=8)
def make_scenes(dataset: str, split: str = "train", n: int | None = None, seed: int = 0,
                size: int = CANVAS) -> Scenes:
    """The first ``n`` canvases (default ``COUNTS[split]``) of ``dataset``'s ``split``."""
    if dataset not in SCENE_DATASETS:
        raise ValueError(f"dense data set {dataset!r}: expected one of {', '.join(SCENE_DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"{dataset}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    if size < 32 or size % 32:
        raise ValueError(f"{dataset}: canvas size must be a positive multiple of 32, got {size}")
    n = COUNTS[split] if n is None else int(n)
    if n < 1:
        raise ValueError(f"{dataset}: number of canvases must be positive, got {n}")
    pool = _Items(dataset, split)
    images, masks, items, boxes, instances = [], [], [], [], []
    for i in range(n):
        image, mask, where, box, inst = render_scene(pool, dataset, split, seed, i, size)
        images.append(image)
        masks.append(mask)
        items.append(where)
        boxes.append(box)
        instances.append(inst)
    images_t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return Scenes(f"{dataset}:{split}", split, images_t, torch.from_numpy(np.stack(masks)), items, boxes,
                  pool.classes, torch.from_numpy(np.stack(instances)))
