"""``m3i eval``: load a checkpoint, embed a data set with the frozen backbone, score a task."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data import ImageFolder, build_source
from ..data.layout import split_folders
from ..data.mixture import unreadable_line
from ..data.spec import evaluated_as
from ..data.splits import SPLIT_SEED, VAL_FRACTION, grouped_split
from .. import memory
from ..device import autocast_for, resolve_device, resolve_precision
from ..objective import Objective
from .. import runs
from . import DATASETS, metrics

TASKS = ("knn", "linear", "zeroshot", "retrieval")


LABEL_TASKS = ("knn", "linear", "zeroshot")
LINEAR_MIN = 10  # train images the linear probe needs: it holds out a tenth to choose its weight decay


def splits(spec: str, split: str = "test"):
    """SPEC -> (train source, train indices, test source, test indices, class names).

    ``split="test"`` trains the probe on the train part and scores the test part;
    ``split="val"`` trains on ``fit`` and scores ``val`` (for choices), never touching test.
    The parts are those of :mod:`m3i.data.splits`, the same the pre-training sources use; a
    folder's are those of its layout (:func:`folder_splits`)."""
    if split not in ("test", "val"):
        raise ValueError(f"--split {split!r}: expected test or val")
    fit, held = ("train", "test") if split == "test" else ("fit", "val")
    kind, _, arg = spec.partition(":")
    names = evaluated_as(spec)  # what the kind offers: seeded sets, or a folder read by its layout
    if arg and any(n.endswith(":PATH") for n in names):
        return folder_splits(spec, Path(arg), split)
    sets = [n for n in names if not n.endswith(":PATH")]
    if not sets:
        raise ValueError(f"--dataset {spec!r}: expected one of {', '.join(DATASETS)}")
    name = spec if arg else sets[0]
    if name not in sets:
        raise ValueError(f"--dataset {spec}: " + (f"expected {', '.join(sets[:-1])} or {sets[-1]}" if len(sets) > 1 else
                         f"{kind} takes no suffix (evaluation picks its parts itself; --split val scores the val "
                         f"part); expected {sets[0]}"))
    tr, te = build_source(f"{name}:{fit}"), build_source(f"{name}:{held}")
    return tr, np.arange(len(tr)), te, np.arange(len(te)), tr.class_names


def folder_splits(spec: str, root: Path, split: str):
    """The parts of an image folder (layouts of :mod:`m3i.data.layout`). Split folders: the probe
    trains on ``train/`` and scores ``test/`` (``val/`` where there is no ``test/``, as ImageNet);
    ``--split val`` scores ``val/`` beside a ``test/``, else a seeded part carved from ``train/``.
    Class folders: seeded train / test (fit / val) parts of the one folder."""
    parts = split_folders(root)
    if parts:
        if "train" not in parts:
            raise ValueError(f"--dataset {spec}: the split folders ({', '.join(parts)}) have no train/ to fit on")
        tr = ImageFolder(parts["train"], name=f"folder:{parts['train']}")
        scored = (parts.get("test") or parts.get("val")) if split == "test" else \
            (parts.get("val") if "test" in parts else None)
        if scored is None and split == "test":
            raise ValueError(f"--dataset {spec}: the split folders have no test/ or val/ to score")
        if scored is None:  # an inner split of train/
            idx_fit, idx_val = (grouped_split(range(len(tr)), s, test_fraction=VAL_FRACTION) for s in ("train", "test"))
            return tr, idx_fit, tr, idx_val, tr.class_names
        te = ImageFolder(scored, name=f"folder:{scored}")
        if tr.class_names != te.class_names:
            raise ValueError(f"--dataset {spec}: train/ and {scored.name}/ have different class folders "
                             f"({tr.class_names[:5]} against {te.class_names[:5]})")
        return tr, np.arange(len(tr)), te, np.arange(len(te)), tr.class_names
    src = build_source(f"folder:{root}")
    if not src.has_labels:
        raise ValueError(f"--dataset {spec}: " + (src.unlabelled_note or "expected one subfolder per class, or split "
                                                  "folders (train/, val/, test/) holding them"))
    keys = range(len(src))
    fit, held = ("train", "test") if split == "test" else ("fit", "val")
    return src, grouped_split(keys, fit), src, grouped_split(keys, held), src.class_names


def check_scorable(task: str, dataset: str, classes: list[str], n_train: int, limit: int | None) -> None:
    """Refuse, before any image is read, a set the task cannot score."""
    if task in LABEL_TASKS:
        if not classes:
            raise ValueError(f"--dataset {dataset}: has no labels; {task} needs labelled images "
                             f"(retrieval scores images against their captions)")
        if len(classes) < 2:
            raise ValueError(f"--dataset {dataset}: holds one class ({classes[0]}); {task} needs at least two")
    if task == "linear" and n_train < LINEAR_MIN:
        given = f"--limit {limit}" if limit is not None else f"--dataset {dataset}"
        raise ValueError(f"{given}: the linear probe needs at least {LINEAR_MIN} train images (it holds out a tenth "
                         f"to choose its weight decay), got {n_train}")


def load_images(src, indices, size: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
    """uint8 (N, 3, S, S), labels (N,), captions for the given indices; unreadable ones counted."""
    from PIL import Image

    images, labels, captions, bad = [], [], [], []
    for i in tqdm(indices, desc=f"load {src.name}", disable=not progress, leave=False):
        try:
            s = src.get(int(i))
        except Exception as e:  # unreadable image: counted and reported below, the first ones named
            bad.append(unreadable_line(src, int(i), e))
            continue
        im = s["image"].convert("RGB").resize((size, size), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        labels.append(s["label"])
        captions.append(s["caption"])
    if bad:
        print(f"{src.name}: skipped {len(bad)} unreadable images of {len(indices)} (first: {'; '.join(bad[:3])})")
    if not images:
        raise ValueError(f"{src.name}: no readable image")
    return torch.stack(images), torch.tensor(labels), captions


@torch.no_grad()
def embed(obj: Objective, images: torch.Tensor, batch_size: int = 512, head: str | None = None,
          progress: bool = True, precision: str = "auto") -> torch.Tensor:
    """Pooled backbone features (or ``head``'s image embedding) of uint8 images, in batches, under
    ``precision``'s autocast (``auto``: bf16 where the device has it)."""
    dev = next(obj.parameters()).device
    out = []
    precision = resolve_precision("auto", dev) if precision == "auto" else precision
    for i in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress, leave=False):
        with autocast_for(dev, precision):
            f = obj.encode_image(images[i:i + batch_size].to(dev), head=head)
        out.append(f.float().cpu())
    return torch.cat(out)


PIXELS = "pixels"


def is_pixels(obj) -> bool:
    """``pixels`` stands for the raw input: the baseline every backbone must beat."""
    return isinstance(obj, str) and obj == PIXELS


def pixel_features(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels, flattened and standardised per pixel with the train part's mean and std."""
    tr, te = (x.flatten(1).float() / 255 for x in (train, test))
    mean, std = tr.mean(0), tr.std(0).clamp_min(1e-3)
    return (tr - mean) / std, (te - mean) / std


def check_text(obj: Objective, task: str) -> None:
    if obj.caption_term() is None:
        raise ValueError(f"--task {task}: this checkpoint's recipe ({obj.recipe.name}) has no text tower; "
                         f"zeroshot and retrieval need a recipe with a caption target (clip, m3i)")


def class_prompts(classes: list[str]) -> list[str]:
    """The text of each class that zero-shot classification scores the images against."""
    return [f"a {name.replace('_', ' ').replace('-', ' ').lower()}" for name in classes]


@torch.no_grad()
def embed_text(obj: Objective, captions: list[str], batch_size: int = 256, precision: str = "fp32") -> torch.Tensor:
    """Caption embeddings, in batches, under ``precision``'s autocast (that of the image side)."""
    dev = next(obj.parameters()).device
    out = []
    for i in range(0, len(captions), batch_size):
        with autocast_for(dev, precision):
            out.append(obj.encode_text(captions[i:i + batch_size]).float().cpu())
    return torch.cat(out)


@dataclass
class EvalSet:
    """A data set loaded once for evaluation: uint8 images, labels and captions of both splits."""

    dataset: str
    classes: list[str]
    test: tuple[torch.Tensor, torch.Tensor, list]
    train: tuple[torch.Tensor, torch.Tensor, list] | None = None


def load_evalset(dataset: str, size: int, with_train: bool = True, limit: int | None = None,
                 progress: bool = True, split: str = "test", task: str | None = None, pixels: bool = False) -> EvalSet:
    """Both parts of ``dataset`` as uint8 images of ``size``; ``task`` (and ``pixels``: raw pixels
    are scored, each kept as floats too) checks, before any image is read, that the set can be
    scored and fits in memory."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: expected a number of images >= 1")
    tr_src, tr_idx, te_src, te_idx, classes = splits(dataset, split)
    if limit:  # a seeded subset, for quick comparisons
        rng = np.random.default_rng(SPLIT_SEED)
        tr_idx = np.sort(rng.choice(tr_idx, min(limit, len(tr_idx)), replace=False))
        te_idx = np.sort(rng.choice(te_idx, min(max(limit // 4, 1), len(te_idx)), replace=False))
    if task is not None:
        check_scorable(task, dataset, list(classes), len(tr_idx) if with_train else 0, limit)
    n = len(te_idx) + (len(tr_idx) if with_train else 0)
    memory.require(n * 3 * size * size * (9 if pixels else 1), "cpu",
                   f"--dataset {dataset} at {size}×{size} px ({n:,} images" +
                   (", as raw pixels of --image-size)" if pixels else ")"))
    test = load_images(te_src, te_idx, size, progress)
    train = load_images(tr_src, tr_idx, size, progress) if with_train else None
    return EvalSet(dataset, list(classes), test, train)


def score(obj: Objective, task: str, data: EvalSet, progress: bool = True, features: dict | None = None,
          precision: str = "auto") -> dict:
    """One task on a loaded data set -> {"task", "dataset", "metrics", "n_train", "n_test"}; the
    images embedded under ``precision``'s autocast (:func:`embed`).

    ``features``: a dict kept across calls for the same model, so k-NN and the linear probe
    on one data set embed its images once."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    te_img, te_y, te_cap = data.test
    n_train = 0
    if task in ("knn", "linear"):
        tr_img, tr_y, _ = data.train
        n_train = len(tr_y)
        if len(torch.unique(tr_y)) < 2:
            raise ValueError(f"--dataset {data.dataset}: the {n_train} train images hold one class; {task} needs "
                             f"two or more (a larger --limit)")
        features = {} if features is None else features
        key = (data.dataset, len(tr_y), len(te_y))
        if key not in features:
            features[key] = (pixel_features(tr_img, te_img) if is_pixels(obj) else
                             (embed(obj, tr_img, progress=progress, precision=precision),
                              embed(obj, te_img, progress=progress, precision=precision)))
        tr_f, te_f = features[key]
        fn = metrics.knn if task == "knn" else metrics.linear_probe
        result = fn(tr_f, tr_y, te_f, te_y, len(data.classes))
    else:
        if is_pixels(obj):
            raise ValueError(f"--task {task}: raw pixels have no text embedding; use knn or linear")
        check_text(obj, task)
        text_precision = "fp32" if precision == "auto" else precision  # fp32 as before, unless the caller sets it
        if task == "zeroshot":
            img = embed(obj, te_img, head="caption", progress=progress, precision=precision)
            result = metrics.zeroshot(img, embed_text(obj, class_prompts(data.classes), precision=text_precision), te_y)
        else:
            keep = [i for i, c in enumerate(te_cap) if c]
            if not keep:
                raise ValueError(f"--dataset {data.dataset}: retrieval needs captions; this data set has none")
            img = embed(obj, te_img[keep], head="caption", progress=progress, precision=precision)
            result = metrics.retrieval(img, embed_text(obj, [te_cap[i] for i in keep], precision=text_precision))
            te_y = te_y[keep]
    return {"task": task, "dataset": data.dataset, "metrics": result, "n_train": n_train, "n_test": int(len(te_y))}


def evaluate(checkpoint: str | Path, task: str, dataset: str, device: str | None = None, progress: bool = True,
             limit: int | None = None, verbose: bool = True, split: str = "test", image_size: int = 32) -> dict:
    """``m3i eval``: one task of one checkpoint (or ``pixels``) on one data set; prints a small table.

    ``image_size`` is the side of the raw pixels that ``pixels`` scores (a checkpoint uses its
    backbone's own size)."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    dev = resolve_device(device)
    if is_pixels(checkpoint):
        if task not in ("knn", "linear"):
            raise ValueError(f"--task {task}: raw pixels have no text embedding; use knn or linear")
        obj, size = PIXELS, image_size
    else:
        obj = runs.load_run(checkpoint, dev)
        size = obj.backbone.img_size
    if task in ("zeroshot", "retrieval"):
        check_text(obj, task)  # fail before loading any data
    data = load_evalset(dataset, size, with_train=task in ("knn", "linear"), limit=limit,
                        progress=progress, split=split, task=task, pixels=is_pixels(obj))
    out = score(obj, task, data, progress)
    out["checkpoint"], out["split"] = str(checkpoint), split
    if verbose:
        print(f"{task} on {dataset}, {split} split ({out['n_train']} train / {out['n_test']} {split})")
        for k, v in out["metrics"].items():
            print(f"  {k:<14} {v:.4f}" if k != "weight_decay" else f"  {k:<14} {v:g}")
    return out


def quality_line(checkpoint: str | Path, limit: int = 10000, device: str | None = None) -> str:
    """One line that says what a pre-training produced: Fashion-MNIST k-NN top-1 of its
    backbone next to raw pixels, on a seeded subset (LIMIT train, LIMIT/4 test images)."""
    dev = resolve_device(device)
    obj = runs.load_run(checkpoint, dev)
    data = load_evalset("fashion-mnist", obj.backbone.img_size, limit=limit, progress=False)
    ours = score(obj, "knn", data, progress=False)["metrics"]["top1"]
    pixels = score(PIXELS, "knn", data, progress=False)["metrics"]["top1"]
    n_tr, n_te = len(data.train[1]), len(data.test[1])
    verdict = "above" if ours > pixels else "not above"
    return (f"quality: Fashion-MNIST k-NN top-1 {ours:.3f}, raw pixels {pixels:.3f} ({verdict} the input; "
            f"{n_tr:,} train / {n_te:,} test images). Full evaluation: m3i eval --checkpoint {checkpoint} "
            f"--task knn --dataset fashion-mnist")
