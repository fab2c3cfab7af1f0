"""Dense evaluation: box detection on the scenes, with a CenterNet head, scored by COCO's and LVIS's AP.

The same light head (:mod:`m3i.eval.centernet`) is trained for the same number of steps on every
backbone's feature map, in two settings:

- ``frozen``: the backbone is fixed and its features of every canvas are computed once (a probe
  of the features, as the segmentation probe);
- ``finetuned``: the backbone is trained with the head, at the same rate.

Baselines under the same head and steps: ``pixels`` (the head on the canvas cut into raw
``PIXEL_PATCH``-sided patches, the floor; it has no backbone, so it is one run that stands for both
settings) and ``scratch`` (a recipe's backbone from random weights, fine-tuned; by default the
``m3i`` recipe's, the demo's).

Ground truth, the frequency bins and the evaluator: :mod:`m3i.eval.boxes`.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..backbones import Backbone, build_backbone
from ..config import ConfigError, Recipe, load_recipe
from ..device import autocast_for, resolve_device, resolve_precision
from .boxes import AREA_RANGES, MAX_DETECTIONS, DetectionSet, box_ap, frequency_bins, scene_detections
from .centernet import OUTPUT_STRIDE, WIDTH, CenterNetHead, center_loss, center_targets, decode
from .segmentation import PIXEL_PATCH, pixel_patches

PIXELS, SCRATCH = "pixels", "scratch"
SETTINGS = ("frozen", "finetuned")
DEFAULT_RECIPE = "m3i"  # a scratch backbone is the demo recipe's unless --recipe says otherwise
STEPS = 1000  # the head's optimiser steps, every backbone and setting alike
BATCH_SIZE = 32
LR = 1e-3  # AdamW, head and (fine-tuned) backbone alike; linear warm-up over a tenth of the steps, then cosine
WEIGHT_DECAY = 1e-4
FEATURE_BATCH = 128
SHOWN = 6  # test canvases drawn in the PNG
SHOWN_SCORE = 0.3  # predicted boxes drawn from this score on


@dataclass
class Encoder:
    """What the head reads: a backbone and its input normalisation, or (no backbone) raw patches."""

    backbone: Backbone | None
    mean: Tensor  # (3,) per channel, images in [0, 1]
    std: Tensor

    def features(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, S, S) on the device -> (B, D, h, w) float."""
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        if self.backbone is None:
            return pixel_patches(images, mean, std, PIXEL_PATCH)
        x = (images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        tokens = self.backbone.forward_features(x).tokens  # (B, h·w, D), row-major
        p = self.backbone.patch_size
        return tokens.transpose(1, 2).reshape(len(x), -1, images.shape[2] // p, images.shape[3] // p)


def make_encoder(model, train_images: Tensor, recipe: str | Recipe | None = None, seed: int = 0) -> Encoder:
    """``model``: a loaded :class:`~m3i.objective.Objective`, ``"pixels"`` (standardised with the train
    canvases' channel statistics, as the segmentation probe) or ``"scratch"`` (``recipe``'s backbone
    with random weights, seeded)."""
    if isinstance(model, str) and model == PIXELS:
        x = train_images.float() / 255
        return Encoder(None, x.mean((0, 2, 3)), x.std((0, 2, 3)).clamp_min(1e-3))
    if isinstance(model, str) and model == SCRATCH:
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe or DEFAULT_RECIPE)
        torch.manual_seed(seed)
        cfg = recipe.backbone
        aug = recipe.views.augment_for(0)
        return Encoder(build_backbone(cfg.name, **cfg.kwargs()), torch.tensor(aug.mean), torch.tensor(aug.std))
    return Encoder(model.backbone, torch.tensor(model.image_mean), torch.tensor(model.image_std))


@torch.no_grad()
def cached_features(enc: Encoder, images: Tensor, dev: torch.device, precision: str) -> Tensor:
    """Frozen features of every canvas: (N, D, h, w) float16 on the CPU."""
    out = []
    for i in range(0, len(images), FEATURE_BATCH):
        with autocast_for(dev, precision):
            out.append(enc.features(images[i:i + FEATURE_BATCH].to(dev)).float().half().cpu())
    return torch.cat(out)


def padded_truth(data: DetectionSet) -> tuple[Tensor, Tensor, Tensor]:
    """Per-canvas boxes and labels padded to the most items: (N, M, 4), (N, M), (N, M) valid."""
    m = max(1, max(len(b) for b in data.boxes))
    boxes, labels = torch.zeros(len(data), m, 4), torch.zeros(len(data), m, dtype=torch.int64)
    valid = torch.zeros(len(data), m, dtype=torch.bool)
    for i, (b, y) in enumerate(zip(data.boxes, data.labels)):
        boxes[i, :len(b)], labels[i, :len(y)], valid[i, :len(y)] = b, y, True
    return boxes, labels, valid


def _schedule(steps: int):
    """The learning rate's factor at step s: linear warm-up over a tenth of the steps, then cosine to 0."""
    warm = max(1, steps // 10)
    return lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Index batches over 0..n-1, a fresh seeded permutation every epoch."""
    stream = torch.empty(0, dtype=torch.int64)
    while True:
        while len(stream) < batch_size:
            stream = torch.cat([stream, torch.randperm(n, generator=gen)])
        yield stream[:batch_size]
        stream = stream[batch_size:]


class TrainingError(RuntimeError):
    """The head's loss stopped being finite (the command line reports it in one line, exit 1)."""


def train_head(head: CenterNetHead, feats_of, truth: tuple[Tensor, Tensor, Tensor], params: list, steps: int,
               dev: torch.device, autocast, seed: int = 0, progress: bool = False) -> list[dict]:
    """``steps`` AdamW steps of the CenterNet loss on seeded batches; ``feats_of(idx)`` gives the
    features of the train canvases ``idx``. Returns the logged losses."""
    from tqdm import tqdm

    boxes, labels, valid = truth
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))
    batches = _batches(len(boxes), BATCH_SIZE, torch.Generator().manual_seed(seed))
    num_classes = head.heat.out_channels
    history = []
    for step in tqdm(range(steps), desc="detection head", unit="step", disable=not progress, dynamic_ncols=True):
        idx = next(batches)
        target = center_targets(boxes[idx].to(dev), labels[idx].to(dev), valid[idx].to(dev), num_classes, head.grid)
        with autocast():
            out = head(feats_of(idx))
        losses = center_loss(out, target)
        if not torch.isfinite(losses["loss"]):
            raise TrainingError(f"the detection loss is {losses['loss'].item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            history.append({"step": step + 1, **{k: round(v.item(), 4) for k, v in losses.items()}})
    return history


@torch.no_grad()
def predict(head: CenterNetHead, feats_of, n: int, canvas: int, autocast) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The head's top ``MAX_DETECTIONS`` boxes on each of ``n`` canvases (``feats_of(idx)``: their features)."""
    head.eval()
    out = []
    for i in range(0, n, FEATURE_BATCH):
        with autocast():
            out += decode(head(feats_of(torch.arange(i, min(n, i + FEATURE_BATCH)))), MAX_DETECTIONS, canvas)
    return out


def _precision(dev: torch.device) -> str:
    """bf16 where the device has it, else fp32 (fp16 would need a gradient scaler)."""
    return "bf16" if resolve_precision("auto", dev) == "bf16" else "fp32"


def run_setting(enc: Encoder, setting: str, train: DetectionSet, test: DetectionSet, dev: torch.device,
                steps: int, seed: int = 0, progress: bool = False) -> tuple[list, dict]:
    """Train a fresh head (``finetuned``: with a copy of the backbone) on ``train``; detect on ``test``."""
    t0 = time.perf_counter()
    precision = _precision(dev)
    autocast = (lambda: autocast_for(dev, precision)) if enc.backbone is not None else nullcontext
    if enc.backbone is not None:
        enc = Encoder(copy.deepcopy(enc.backbone).to(dev).eval(), enc.mean, enc.std)
    grid = cached_features(enc, train.images[:1], dev, precision).shape[1:]  # (D, h, w)
    if setting == "finetuned":
        enc.backbone.freeze_patch_embed(False)  # a stem frozen in pre-training is trained too (as m3i finetune)
        enc.backbone.train()
        tr_of = lambda idx: enc.features(train.images[idx].to(dev))
    else:
        tr_f = cached_features(enc, train.images, dev, precision)
        tr_of = lambda idx: tr_f[idx].to(dev)
    torch.manual_seed(seed)
    head = CenterNetHead(grid[0], len(train.classes), train.images.shape[-1] // OUTPUT_STRIDE).to(dev).train()
    params = list(head.parameters())
    if setting == "finetuned":
        params += [p for p in enc.backbone.parameters() if p.requires_grad]
    t_train = time.perf_counter()
    history = train_head(head, tr_of, padded_truth(train), params, steps, dev, autocast, seed, progress)
    t_train = time.perf_counter() - t_train
    if enc.backbone is not None:
        enc.backbone.eval()
    te_f = cached_features(enc, test.images, dev, precision)
    detections = predict(head, lambda idx: te_f[idx].to(dev), len(test), int(test.images.shape[-1]), autocast)
    return detections, {"seconds": round(time.perf_counter() - t0, 1), "train_seconds": round(t_train, 1),
                        "feature_grid": list(grid[1:]), "history": history}


# ------------------------------------------------------------------ task


def settings_for(model, setting: str | None) -> tuple[str, ...]:
    """The settings a run scores: a model both, ``pixels`` frozen (it has nothing to fine-tune),
    ``scratch`` fine-tuned; ``setting`` picks one."""
    pixels, scratch = (isinstance(model, str) and model == m for m in (PIXELS, SCRATCH))
    if setting in (None, "both"):
        return ("frozen",) if pixels else ("finetuned",) if scratch else SETTINGS
    if setting not in SETTINGS:
        raise ValueError(f"--setting {setting!r}: expected frozen, finetuned or both")
    if pixels and setting == "finetuned":
        raise ValueError("--checkpoint pixels --setting finetuned: raw patches have no backbone to fine-tune; the "
                         "head on them (--setting frozen) is the floor of both settings")
    return (setting,)


def scratch_recipe(recipe: str | Path | Recipe | None) -> Recipe:
    """A scratch backbone's recipe: a Recipe, a name or .yaml file, or a run directory (its own recipe)."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe is not None and Path(recipe).is_dir():
        from ..runs import read_recipe

        return read_recipe(recipe)
    return load_recipe(str(recipe or DEFAULT_RECIPE))


def _check(model, dataset: str, split: str, setting: str | None, recipe, steps: int) -> tuple[str, ...]:
    """Every argument's mistake, in one line, before any work."""
    from .boxes import parse_dataset

    parse_dataset(dataset)
    if split not in ("test", "val"):
        raise ValueError(f"--split {split!r}: expected test or val")
    if recipe is not None and not (isinstance(model, str) and model == SCRATCH):
        raise ConfigError("--recipe: only for --checkpoint scratch (the backbone it builds); a checkpoint brings "
                          "its own backbone")
    if steps < 1:
        raise ValueError(f"--steps {steps}: the head needs at least one step")
    return settings_for(model, setting)


def detection_score(model, dataset: str, split: str = "test", setting: str | None = None,
                    recipe: str | Path | Recipe | None = None, steps: int | None = None, limit: int | None = None,
                    device: str | None = None, seed: int = 0, png: str | Path | None = None,
                    name: str | None = None, progress: bool = False) -> dict:
    """Box AP of a CenterNet head on ``model``'s features, per setting.

    ``model``: a run or checkpoint directory, a loaded :class:`~m3i.objective.Objective`, ``"pixels"``
    or ``"scratch"`` (built from ``recipe``: a name, a .yaml file, a run directory or a
    :class:`~m3i.config.Recipe`; default the ``m3i`` recipe).
    ``split="test"`` trains on the train canvases and scores the test canvases; ``"val"`` trains on
    fit and scores val. ``limit``: LIMIT train and LIMIT/4 scored canvases. ``png``: draw the true
    and predicted boxes of a few scored canvases there. Returns ``{"task", "dataset", "split",
    "checkpoint", "backbone", "metrics": {setting: {"AP", "AP50", "AP75", "AP_small", "AP_medium",
    "AP_large", "AP_r", "AP_c", "AP_f", "AR100"}}, "settings": {setting: {"seconds",
    "train_seconds", "feature_grid", "history"}}, "head", "frequency", "area_ranges", ...}``."""
    steps = STEPS if steps is None else steps
    settings = _check(model, dataset, split, setting, recipe, steps)
    scratch = isinstance(model, str) and model == SCRATCH
    recipe = scratch_recipe(recipe) if scratch else None  # its mistakes before any work
    if isinstance(model, (str, Path)) and str(model) not in (PIXELS, SCRATCH):
        from ..runs import load_run

        name, model = name or str(model), load_run(model)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    fit, held = ("train", "test") if split == "test" else ("fit", "val")
    n_fit, n_held = (limit, max(1, limit // 4)) if limit else (None, None)
    train, test = scene_detections(dataset, fit, n_fit, seed), scene_detections(dataset, held, n_held, seed)
    freq = frequency_bins(train)
    bins = [freq["bin"][c] for c in test.classes]
    enc = make_encoder(model, train.images, recipe, seed)
    metrics, runs, shown = {}, {}, {}
    for s in settings:
        detections, runs[s] = run_setting(enc, s, train, test, dev, steps, seed, progress)
        metrics[s] = box_ap(test, detections, bins)
        shown[s] = detections[:SHOWN]
    if png is not None:
        draw_detections(png, test, shown)
    backbone = None if enc.backbone is None else (recipe if scratch else model.recipe).backbone.name
    return {"task": "detection", "dataset": dataset, "split": split, "checkpoint": name or str(
        model if isinstance(model, str) else getattr(model.recipe, "name", "model")), "backbone": backbone,
        "metrics": metrics, "settings": runs,
        "head": {"kind": "centernet", "output_stride": OUTPUT_STRIDE, "width": WIDTH, "steps": steps,
                 "batch_size": BATCH_SIZE, "lr": LR, "weight_decay": WEIGHT_DECAY, "max_detections": MAX_DETECTIONS,
                 "pixel_patch": PIXEL_PATCH if enc.backbone is None else None},
        "frequency": freq, "area_ranges": AREA_RANGES, "classes": len(test.classes), "n_train": len(train),
        "n_test": len(test), "boxes_train": sum(len(b) for b in train.boxes),
        "boxes_test": sum(len(b) for b in test.boxes), "hidden_items_test": test.hidden,
        "canvas": int(test.images.shape[-1]), "png": None if png is None else str(png),
        "seconds": round(time.perf_counter() - t0, 1)}


def draw_detections(path: str | Path, test: DetectionSet, shown: dict[str, list]) -> None:
    """One row per setting: the first test canvases, true boxes dashed green, predictions red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = min(SHOWN, len(test))
    fig, axes = plt.subplots(len(shown), cols, figsize=(2.2 * cols, 2.7 * len(shown)), squeeze=False)
    for r, (setting, detections) in enumerate(shown.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(test.images[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"{setting}, canvas {c}", fontsize=7)
            for x0, y0, x1, y1 in test.boxes[c].tolist():  # pixel edges: pixel i spans [i − ½, i + ½]
                ax.add_patch(Rectangle((x0 - .5, y0 - .5), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.5, ls="--"))
            for (x0, y0, x1, y1), s, y in zip(*(t.tolist() for t in detections[c])):
                if s >= SHOWN_SCORE:
                    ax.add_patch(Rectangle((x0 - .5, y0 - .5), x1 - x0, y1 - y0, fill=False, ec="red", lw=1))
                    ax.text(x0 - .5, y0 - .5, f"{test.classes[y]} {s:.2f}", color="red", fontsize=5, va="bottom",
                            clip_on=True)
    fig.suptitle(f"{test.name}: true boxes (green, dashed), predicted (red, score >= {SHOWN_SCORE})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def evaluate_detection(model, dataset: str, split: str = "test", verbose: bool = True, **kw) -> dict:
    """``m3i eval --task detection``: score and print a small table (keywords as :func:`detection_score`)."""
    out = detection_score(model, dataset, split, **kw)
    if verbose:
        head = out["head"]
        print(f"detection on {dataset}, {split} split ({out['n_train']} train / {out['n_test']} {split} canvases of "
              f"{out['canvas']} px, {out['classes']} classes; CenterNet head, {head['steps']} steps x "
              f"{head['batch_size']})")
        names = list(next(iter(out["metrics"].values())))
        print(f"  {'setting':<10}" + "".join(f"{k:>10}" for k in names) + f"{'seconds':>10}")
        for s, m in out["metrics"].items():
            cells = "".join(f"{'n/a' if v is None else f'{v:.4f}':>10}" for v in m.values())
            print(f"  {s:<10}{cells}{out['settings'][s]['seconds']:>10.1f}")
        if out["png"]:
            print(f"boxes drawn: {out['png']}")
    return out
