"""Dense evaluation: a linear segmentation probe on frozen patch features.

The probe is dinov2's linear head: BatchNorm + a 1×1 convolution on the frozen patch feature
map, logits upsampled bilinearly to the pixels, trained with per-pixel cross-entropy. Because
the head is linear it is fitted as a convex problem (L-BFGS on a seeded sample of pixels, see
`fit_probe`), with its weight decay chosen on held-out train canvases: nothing is tuned on the
scored split, and the same call gives the same numbers.

Features: a ViT's final-norm patch tokens (its position table resampled when the canvas is
larger than its training size), a ConvNeXt's last feature map, or, for ``pixels``, the
canvas standardised per channel and cut into ``PIXEL_PATCH``-sided patches.

Scores: ``mIoU`` over every class present in the prediction or the truth, background included,
from one confusion matrix over the whole scored split, and pixel accuracy.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..device import autocast_for, resolve_device, resolve_precision
from ..data.scenes import SCENE_DATASETS, make_scenes
from .metrics import _fit_softmax

PIXELS = "pixels"
PIXEL_PATCH = 8  # side of a raw-pixel patch: the 64-pixel canvas becomes an 8 × 8 grid of 192 values
PIXELS_PER_CANVAS = 32  # seeded pixels per train canvas that the probe is fitted on
WEIGHT_DECAY = 1e-4  # fixed: ~10^5 sampled pixels against ~10^3 weights per class


# ------------------------------------------------------------------ metric


def confusion_matrix(pred: Tensor, truth: Tensor, num_classes: int) -> Tensor:
    """(…) predicted and true labels -> (C, C) int64 counts, rows = truth, columns = prediction."""
    idx = truth.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf: Tensor) -> dict[str, float]:
    """mIoU (mean over classes with a non-empty union) and pixel accuracy of a confusion matrix."""
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = tp[present] / union[present]
    return {"mIoU": iou.mean().item(), "pixel_acc": (tp.sum() / conf.sum()).item()}


def per_class_iou(conf: Tensor, classes: list[str]) -> dict[str, float | None]:
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    return {c: (tp[k] / union[k]).item() if union[k] > 0 else None for k, c in enumerate(classes)}


# ------------------------------------------------------------------ features


def pixel_patches(images: Tensor, mean: Tensor, std: Tensor, patch: int = PIXEL_PATCH) -> Tensor:
    """uint8 (N, 3, S, S) -> (N, 3·p², S/p, S/p) standardised raw pixels, one column per patch."""
    x = (images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    n, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"pixel patches: canvas {h}x{w} is not a multiple of the patch side {patch}")
    x = x.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * patch * patch, h // patch, w // patch)  # channels in F.unfold's order


@torch.no_grad()
def patch_features(obj, images: Tensor, batch_size: int = 128) -> Tensor:
    """Frozen backbone patch features of uint8 canvases: (N, D, S/stride, S/stride), float16 on the CPU."""
    backbone = obj.backbone
    dev = next(obj.parameters()).device
    gh, gw = images.shape[2] // backbone.patch_size, images.shape[3] // backbone.patch_size
    out = []
    for i in range(0, len(images), batch_size):
        x = obj.normalize(images[i:i + batch_size].to(dev))
        with autocast_for(dev, resolve_precision("auto", dev)):  # as `run.embed`
            tokens = backbone.forward_features(x).tokens  # (B, gh·gw, D), row-major
        out.append(tokens.float().transpose(1, 2).reshape(len(x), -1, gh, gw).half().cpu())
    return torch.cat(out)


# ------------------------------------------------------------------ probe


class LinearSegmentationHead(nn.Module):
    """BatchNorm + 1×1 conv on a (B, D, h, w) feature map; logits upsampled to the pixels."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim, affine=False)
        self.conv = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, feats: Tensor, size: tuple[int, int]) -> Tensor:
        logits = self.conv(self.bn(feats.float()))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def upsampled_at(feats: Tensor, ys: Tensor, xs: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of (N, D, h, w) features to ``size``, read only at pixels (N, P) -> (N, P, D).

    Equals ``F.interpolate(feats, size, mode="bilinear", align_corners=False)[n, :, ys, xs]``
    without building the full-resolution map."""
    h, w = size
    grid = torch.stack([(xs.float() + 0.5) / w * 2 - 1, (ys.float() + 0.5) / h * 2 - 1], dim=-1)  # (N, P, 2)
    out = F.grid_sample(feats.float(), grid[:, None], mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, 0].transpose(1, 2)


def sample_pixels(feats: Tensor, masks: Tensor, per_canvas: int, seed: int = 0,
                  batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``per_canvas`` seeded pixels of every canvas: upsampled features (M, D) and labels (M,)."""
    g = torch.Generator().manual_seed(seed)
    n, (h, w) = len(feats), masks.shape[-2:]
    ys, xs = torch.randint(0, h, (n, per_canvas), generator=g), torch.randint(0, w, (n, per_canvas), generator=g)
    x = torch.cat([upsampled_at(feats[i:i + batch_size], ys[i:i + batch_size], xs[i:i + batch_size], (h, w))
                   for i in range(0, n, batch_size)])
    y = masks[torch.arange(n)[:, None], ys, xs]
    return x.reshape(n * per_canvas, -1), y.reshape(-1)


def fit_probe(feats: Tensor, masks: Tensor, num_classes: int, weight_decay: float = WEIGHT_DECAY,
              pixels_per_canvas: int = PIXELS_PER_CANVAS, seed: int = 0) -> LinearSegmentationHead:
    """Train the head on (N, D, h, w) features against (N, S, S) label maps.

    BatchNorm (affine-free) and bilinear upsampling are both per-channel affine maps with weights
    summing to one, so they commute: the head's logit at a pixel is its 1×1 conv applied to the
    standardised, upsampled feature there. The head is therefore fitted as a multinomial logistic
    regression on the upsampled features of a seeded sample of pixels (the per-pixel cross-entropy,
    estimated on that sample), its BatchNorm holding the train features' channel statistics.
    """
    head = LinearSegmentationHead(feats.shape[1], num_classes)
    flat = feats.float().transpose(0, 1).reshape(feats.shape[1], -1)
    mean, var = flat.mean(1), flat.var(1, unbiased=False)
    head.bn.running_mean.copy_(mean)
    head.bn.running_var.copy_(var)
    x, y = sample_pixels(feats, masks, pixels_per_canvas, seed)
    x = (x - mean) / (var + head.bn.eps).sqrt()
    linear = _fit_softmax(x, y, num_classes, weight_decay)
    with torch.no_grad():
        head.conv.weight.copy_(linear.weight[:, :, None, None])
        head.conv.bias.copy_(linear.bias)
    return head.eval()


@torch.no_grad()
def score_probe(head: LinearSegmentationHead, feats: Tensor, masks: Tensor, num_classes: int,
                batch_size: int = 256) -> Tensor:
    """Confusion matrix of the head's per-pixel argmax on (N, D, h, w) features."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    size = tuple(masks.shape[-2:])
    for i in range(0, len(feats), batch_size):
        pred = head(feats[i:i + batch_size], size).argmax(1)
        conf += confusion_matrix(pred, masks[i:i + batch_size], num_classes)
    return conf


def linear_segmentation(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, classes: list[str],
                        **probe) -> tuple[dict[str, float], dict]:
    """Fit the probe on train, score test -> (metrics, per-class IoU)."""
    head = fit_probe(train_f, train_y, len(classes), **probe)
    conf = score_probe(head, test_f, test_y, len(classes))
    return segmentation_metrics(conf), per_class_iou(conf, classes)


# ------------------------------------------------------------------ task


def segmentation_score(model, dataset: str, split: str = "test", device: str | None = None,
                       limit: int | None = None, seed: int = 0, pixel_patch: int = PIXEL_PATCH,
                       progress: bool = False, **probe) -> dict:
    """The linear segmentation probe of ``model`` on a dense data set.

    ``model``: a run or checkpoint directory, a loaded :class:`~m3i.objective.Objective`, or
    ``"pixels"``. ``split="test"`` fits on the train canvases and scores the test canvases;
    ``"val"`` fits on fit and scores val. ``limit``: LIMIT train and LIMIT/4 scored canvases.
    Returns ``{"task", "dataset", "split", "checkpoint", "metrics": {"mIoU", "pixel_acc"},
    "iou": {class: IoU}, "n_train", "n_test", "canvas", "seconds"}``.
    """
    if dataset not in SCENE_DATASETS:
        raise ValueError(f"--task segmentation needs a dense data set: --dataset {dataset!r}, expected one of "
                         f"{', '.join(SCENE_DATASETS)}")
    if split not in ("test", "val"):
        raise ValueError(f"--split {split!r}: expected test or val")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    fit, held = ("train", "test") if split == "test" else ("fit", "val")
    n_fit, n_held = (limit, max(1, limit // 4)) if limit else (None, None)
    tr, te = make_scenes(dataset, fit, n_fit), make_scenes(dataset, held, n_held)
    pixels = isinstance(model, str) and model == PIXELS
    if pixels:
        x = tr.images.float() / 255
        mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3)).clamp_min(1e-3)
        tr_f, te_f = (pixel_patches(s.images, mean, std, pixel_patch) for s in (tr, te))
    else:
        if isinstance(model, (str, Path)):
            from ..runs import load_run

            obj = load_run(model, dev)
        else:
            obj = model.eval()
        if progress:
            print(f"features of {len(tr) + len(te)} canvases")
        tr_f, te_f = patch_features(obj, tr.images), patch_features(obj, te.images)
    metrics, iou = linear_segmentation(tr_f, tr.masks, te_f, te.masks, tr.classes, seed=seed, **probe)
    name = PIXELS if pixels else (str(model) if isinstance(model, (str, Path)) else getattr(
        getattr(model, "recipe", None), "name", "model"))
    return {"task": "segmentation", "dataset": dataset, "split": split, "checkpoint": name, "metrics": metrics,
            "iou": iou, "n_train": len(tr), "n_test": len(te), "canvas": int(tr.images.shape[-1]),
            "feature_grid": list(tr_f.shape[-2:]), "seconds": round(time.perf_counter() - t0, 1)}


def evaluate_segmentation(checkpoint: str | Path, dataset: str, split: str = "test", device: str | None = None,
                          limit: int | None = None, progress: bool = True, verbose: bool = True) -> dict:
    """``m3i eval --task segmentation``: score and print a small table."""
    out = segmentation_score(checkpoint, dataset, split, device=device, limit=limit, progress=progress)
    if verbose:
        print(f"segmentation on {dataset}, {split} split ({out['n_train']} train / {out['n_test']} {split} canvases "
              f"of {out['canvas']} px, features {out['feature_grid'][0]}x{out['feature_grid'][1]})")
        for k, v in out["metrics"].items():
            print(f"  {k:<14} {v:.4f}")
    return out
