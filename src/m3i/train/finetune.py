"""``m3i finetune``: end-to-end fine-tuning of the backbone f_θ with a classification head.

The protocol of BEiT, MAE and SIM, shortened for small budgets: AdamW with layer-wise
learning-rate decay (block i of L learns at ``lr · layer_decay^(L − i)``), linear warm-up then
cosine, drop-path, label smoothing, and MixUp / CutMix (kornia). ``scratch`` runs the same
schedule from a random initialisation: the baseline pre-training must beat.

Fine-tuning is training: a small task (the classifier's loss on augmented, mixed views) run by
the loop that pre-trains (:func:`m3i.train.loop.train`), with its schedule, precision, skipped
non-finite steps and run folder. The held-out split is scored (m3i.eval.finetune) at the last
step, as an in-run monitor. The fine-tuned weights are written as an ordinary run (``config.yaml``,
``metrics.jsonl``, ``checkpoints/``), so ``m3i eval`` and ``m3i export`` load them; the head, the
classes and the run's settings and scores are kept with the checkpoint's training state.
"""
from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import kornia.augmentation as KA
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from tqdm import tqdm

from .. import runs
from ..backbones import Backbone
from ..batch import Batch, Losses
from ..config import ConfigError, Strict, TrainCfg, apply_override, load_recipe, validate
from ..device import autocast_for, resolve_device, resolve_precision
from ..eval.finetune import accuracy
from ..eval.run import load_images, splits
from ..layers import DropPath, no_weight_decay
from ..objective import Objective
from ..runs import checkpoint as ckpt
from ..runs import load_run
from ..runs.lock import RunLock
from ..views import ViewAugment
from .hooks import Checkpoint, Health, Log, MetricLog, Monitoring
from .loop import train
from .setup import Run, flush_subnormals, make_run

SCRATCH = "scratch"
DEFAULT_RECIPE = "m3i"  # a scratch backbone is this recipe's unless --recipe / backbone=... say otherwise


class FinetuneCfg(Strict):
    """Every knob of a fine-tuning run; defaults suit a few hundred steps on 32-pixel images."""

    steps: int = Field(150, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0)  # the head's (and final norm's) peak rate; block i gets lr · decay^(L − i)
    min_lr: float = Field(1e-6, ge=0)
    warmup_steps: int | None = Field(None, ge=0)  # default: a tenth of the steps
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = Field(0.75, ge=0, le=1)
    drop_path: float = Field(0.1, ge=0, lt=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mix_prob: float = Field(0.0, ge=0, le=1)  # share of batches mixed (MixUp or CutMix)
    cutmix_share: float = Field(0.5, ge=0, le=1)  # of the mixed batches, those mixed by CutMix
    mixup_range: tuple[float, float] = (0.0, 1.0)  # MixUp's λ is uniform in this range (kornia)
    cutmix_beta: float = Field(1.0, gt=0)
    crop_scale: tuple[float, float] = (0.8, 1.0)  # light: short schedules have no time to undo heavy crops
    flip_p: float = Field(0.5, ge=0, le=1)
    clip_grad: float = Field(0.0, ge=0)  # 0: no clipping
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # as pre-training's train.precision
    max_bad_steps: int = Field(10, ge=1)  # steps in a row with a loss or gradients not finite that stop the run
    eval_batch_size: int = Field(512, ge=1)
    test_limit: int | None = Field(None, ge=1)  # score a seeded subset of the scored split
    score_start: bool = False  # also score the model before the first step
    log_every: int = Field(10, ge=1)
    seed: int = 0

    def warmup(self) -> int:
        return self.steps // 10 if self.warmup_steps is None else self.warmup_steps


def load_config(overrides: Sequence[str] | Mapping[str, Any] = (), **given: Any) -> tuple[FinetuneCfg, list[str]]:
    """``key=value`` overrides (or a mapping) -> (fine-tuning config, the backbone overrides).

    ``backbone=NAME`` and ``backbone.*=...`` describe the backbone of a scratch run and are passed
    to its recipe; everything else is a :class:`FinetuneCfg` field. ``given`` (e.g. ``steps``)
    is applied last, where not None."""
    if isinstance(overrides, Mapping):
        items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    else:
        items = list(overrides)
    data: dict = {}
    backbone = []
    for item in items:
        key = item.split("=", 1)[0].strip()
        if key == "backbone" or key.startswith("backbone."):
            backbone.append(item)
        else:
            data = apply_override(data, item)
    data.update({k: v for k, v in given.items() if v is not None})
    cfg = validate(data, "finetune", FinetuneCfg)
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"finetune: min_lr: {cfg.min_lr:g} is above lr={cfg.lr:g}; the schedule decays from lr to "
                          f"min_lr")
    if not 0 <= cfg.mixup_range[0] <= cfg.mixup_range[1] <= 1:
        raise ConfigError(f"finetune: mixup_range: expected 0 <= lo <= hi <= 1, got {list(cfg.mixup_range)}")
    if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        raise ConfigError(f"finetune: crop_scale: expected 0 < lo <= hi <= 1, got {list(cfg.crop_scale)}")
    return cfg, backbone


def train_settings(cfg: FinetuneCfg, precision: str = "fp32") -> TrainCfg:
    """What the shared loop reads, from a fine-tuning config (``precision`` resolved): the schedule,
    clipping, logging and the bad-step limit; one checkpoint, at the last step. A warm-up longer
    than the run is cut short, as in pre-training, with a warning."""
    warmup = cfg.warmup()
    if warmup > cfg.steps:
        warnings.warn(f"finetune: warmup_steps {warmup} is more than steps {cfg.steps}: the warm-up is cut short, "
                      f"the run ending at {cfg.steps / (warmup + 1):.0%} of lr", stacklevel=2)
    return TrainCfg(steps=cfg.steps, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=warmup, weight_decay=cfg.weight_decay,
                    betas=cfg.betas, clip_grad=cfg.clip_grad, precision=precision, seed=cfg.seed,
                    log_every=cfg.log_every, ckpt_every=cfg.steps, max_bad_steps=cfg.max_bad_steps, report_to=[])


def initial_model(checkpoint: str | Path, num_classes: int, recipe: str | None = None,
                  backbone_overrides: Sequence[str] = (), seed: int = 0) -> Objective:
    """The objective whose backbone is fine-tuned: a run's (its saved weights) or, for ``scratch``,
    a freshly initialised one from ``recipe`` (default m3i) with ``backbone_overrides``."""
    if str(checkpoint) != SCRATCH:
        if recipe or backbone_overrides:
            raise ConfigError(f"--checkpoint {checkpoint}: the backbone comes from the checkpoint; "
                              f"--recipe and backbone=... overrides are for --checkpoint scratch")
        obj = load_run(checkpoint)
        obj.backbone.freeze_patch_embed(False)  # a patch embedding frozen in pre-training is fine-tuned (SIM)
        return obj
    torch.manual_seed(seed)
    return Objective(load_recipe(recipe or DEFAULT_RECIPE, overrides=list(backbone_overrides)), num_classes)


def set_drop_path(backbone: Backbone, rates: float | Sequence[float]) -> list[float]:
    """Stochastic depth: a number rises linearly from 0 to it over the blocks, a list gives each
    block its rate; returns the rates it replaced."""
    paths = [m for m in backbone.modules() if isinstance(m, DropPath)]
    old = [m.p for m in paths]
    if isinstance(rates, (int, float)):
        rates = torch.linspace(0, rates, len(paths)).tolist()
    for m, p in zip(paths, rates):
        m.p = p
    return old


def layer_decay_groups(backbone: Backbone, head: nn.Module, lr: float, weight_decay: float,
                       layer_decay: float) -> list[dict]:
    """AdamW groups: every parameter at ``lr · layer_decay^(L − layer_id)``, L = ``backbone.num_layers``
    (the head at level L); no weight decay on 1-D tensors and on what the backbone's modules list
    in their ``no_weight_decay()`` (class, position and mask tokens)."""
    top = backbone.num_layers
    exempt = no_weight_decay(backbone)
    named = [(n, p, backbone.layer_id(n)) for n, p in backbone.named_parameters()]
    named += [(f"head.{n}", p, top) for n, p in head.named_parameters()]
    groups: dict[tuple[int, bool], dict] = {}
    for name, p, layer in named:
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in exempt
        scale = layer_decay ** (top - layer)
        g = groups.setdefault((layer, decay), {"params": [], "names": [], "layer_id": layer, "lr_scale": scale,
                                               "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


class MixCut(nn.Module):
    """Label smoothing, then MixUp or CutMix on a share of batches: images and soft targets."""

    def __init__(self, cfg: FinetuneCfg, num_classes: int):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        self.mixup = KA.RandomMixUpV2(lambda_val=tuple(cfg.mixup_range), p=1.0, data_keys=["input", "class"])
        self.cutmix = KA.RandomCutMixV2(beta=cfg.cutmix_beta, p=1.0, use_correct_lambda=True,
                                        data_keys=["input", "class"])

    def smooth(self, y: Tensor) -> Tensor:
        eps = self.cfg.label_smoothing
        return F.one_hot(y, self.num_classes).float() * (1 - eps) + eps / self.num_classes

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W), y (B,) long -> mixed x, soft targets (B, num_classes)."""
        target = self.smooth(y)
        if self.cfg.mix_prob == 0 or torch.rand(()) >= self.cfg.mix_prob:
            return x, target
        if torch.rand(()) < self.cfg.cutmix_share:
            x, lab = self.cutmix(x, y)
            lab = lab[0]
            own = lab[:, 2]  # CutMix (use_correct_lambda): the share of the image still its own
        else:
            x, lab = self.mixup(x, y)
            own = 1 - lab[:, 2]  # MixUp: λ is the partner's share
        partner = self.smooth(lab[:, 1].long())
        own = own.float()[:, None]
        return x, own * target + (1 - own) * partner


class Classifier(nn.Module):
    """The backbone's pooled feature -> a linear head over the classes."""

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: a near-zero head, so the start is uniform
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class ClassifierTask(nn.Module):
    """What the loop trains when it fine-tunes: the classifier's cross-entropy against soft
    targets, on a random resized crop and flip of each image, mixed (:class:`MixCut`). It has no
    loss terms beside ``loss`` and no teacher; its checkpoint holds ``weights()``: the objective
    whose backbone it fine-tunes, the head aside."""

    terms = ()

    def __init__(self, classifier: Classifier, view: ViewAugment, mixcut: MixCut, weights: Callable[[], dict]):
        super().__init__()
        self.classifier, self.view, self.mixcut, self.weights = classifier, view, mixcut, weights

    def stage(self, batch: Batch, device: torch.device) -> dict:
        """uint8 images (B, 3, S, S) and labels (B,) -> the augmented, mixed images and their soft targets."""
        x, _, _ = self.view(batch.images.to(device).float() / 255)
        x, target = self.mixcut(x, batch.labels.to(device))
        return {"image": x, "target": target}

    def forward(self, batch: dict) -> Losses:
        logits = self.classifier(batch["image"])
        return Losses(torch.sum(-batch["target"] * F.log_softmax(logits.float(), dim=-1), dim=-1).mean(), {}, {})

    def update_teacher(self, step: int, total_steps: int, skip: Tensor | None = None) -> None:
        return None

    def checkpoint_state(self, state: dict | None = None) -> dict[str, Tensor]:
        return self.weights()


@dataclass
class Images:
    """The train and the held-out images (uint8, (N, 3, S, S)) and labels of a fine-tuning run."""

    train: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor
    classes: list[str]


def load_data(parts: tuple, size: int, cfg: FinetuneCfg, progress: bool) -> Images:
    """``parts`` (:func:`m3i.eval.run.splits`) -> the first steps·batch images of a seeded shuffle of
    the train part (all of it if that is less) and the held-out part (a seeded subset with ``test_limit``)."""
    tr_src, tr_idx, te_src, te_idx, classes = parts
    rng = np.random.default_rng(cfg.seed)
    tr_idx = rng.permutation(tr_idx)[: cfg.steps * cfg.batch_size]
    if cfg.test_limit:
        te_idx = np.sort(rng.choice(te_idx, min(cfg.test_limit, len(te_idx)), replace=False))
    tr_img, tr_y, _ = load_images(tr_src, tr_idx, size, progress)
    te_img, te_y, _ = load_images(te_src, te_idx, size, progress)
    return Images(tr_img, tr_y, te_img, te_y, list(classes))


def batches(images: Tensor, labels: Tensor, batch_size: int, seed: int) -> Iterator[dict]:
    """Batches of exactly ``batch_size``: in order first (the loaded order is already a seeded
    shuffle), then a fresh permutation every further epoch."""
    gen, n = torch.Generator().manual_seed(seed), len(labels)
    stream = torch.arange(n)
    while True:
        while len(stream) < batch_size:
            stream = torch.cat([stream, torch.randperm(n, generator=gen)])
        idx, stream = stream[:batch_size], stream[batch_size:]
        yield Batch(labels=labels[idx], captions=[None] * len(idx), images=images[idx])  # held in memory: none unreadable


class Scoring:
    """Top-1 / top-5 of the classifier on the held-out images (m3i.eval.finetune.accuracy): the
    monitor of the last step, its scores kept in ``metrics`` too."""

    def __init__(self, classifier: Classifier, data: Images, obj: Objective, dev: torch.device, precision: str,
                 cfg: FinetuneCfg, metrics: dict, progress: bool):
        self.classifier, self.data, self.metrics, self.progress = classifier, data, metrics, progress
        self.mean = torch.tensor(obj.image_mean, device=dev).view(1, -1, 1, 1)
        self.std = torch.tensor(obj.image_std, device=dev).view(1, -1, 1, 1)
        self.batch_size, self.autocast = cfg.eval_batch_size, lambda: autocast_for(dev, precision)

    def measure(self) -> dict[str, float]:
        return accuracy(self.classifier, self.data.test, self.data.test_labels, self.mean, self.std, self.batch_size,
                        self.autocast, self.progress)

    def __call__(self, task: nn.Module) -> dict[str, float]:
        scores = self.measure()
        self.metrics.update(scores)
        return scores


def step_lrs(run: Run) -> Callable[[int], list[float]]:
    """Each group's learning rate at the step just taken (a fine-tuning row logs every layer's)."""
    factor = run.sched.lr_lambdas[0]
    return lambda step: [g["initial_lr"] * factor(step - 1) for g in run.opt.param_groups]


def finetune(checkpoint: str | Path, dataset: str, steps: int | None = None,
             overrides: Sequence[str] | Mapping[str, Any] = (), recipe: str | None = None, split: str = "test",
             out: str | Path | None = None, device: str | None = None, progress: bool = True,
             seed: int | None = None, verbose: bool = True) -> dict:
    """Fine-tune ``checkpoint`` (a run, a checkpoint directory or ``scratch``) on ``dataset``.

    Trains on the train part (``split="val"``: on ``fit``) and scores the test part (``val``).
    Returns ``{"task": "finetune", "dataset", "split", "checkpoint", "metrics": {"top1", "top5"[,
    "start_top1"]}, "n_train", "n_test", "steps", "backbone", "config", "history", "seconds",
    "train_seconds", "score_seconds", "out"}``; with ``out``, the run is written there (locked
    while it runs) and ``out`` is its checkpoint. ``seed`` (default 0) fixes the head, the data
    order, the crops and the mixing, and a scratch backbone's initialisation."""
    t0 = time.perf_counter()
    cfg, backbone_overrides = load_config(overrides, steps=steps, seed=seed)
    dev = resolve_device(device)
    out = Path(out) if out is not None else None
    with RunLock(out) if out is not None else nullcontext(), flush_subnormals(dev):
        parts = splits(dataset, split)
        if len(parts[4]) < 2:
            raise ValueError(f"--dataset {dataset}: fine-tuning needs at least two classes, got {len(parts[4])}")
        obj = initial_model(checkpoint, len(parts[4]), recipe, backbone_overrides, cfg.seed)
        data = load_data(parts, obj.backbone.img_size, cfg, progress)
        result = {"task": "finetune", "dataset": dataset, "split": split, "checkpoint": str(checkpoint), "metrics": {},
                  "n_train": int(len(data.train_labels)), "n_test": int(len(data.test_labels)), "steps": cfg.steps,
                  "backbone": obj.recipe.backbone.name, "config": cfg.model_dump(mode="json")}
        history, last, train_s, score_s = tune(obj, data, cfg, dev, out, result, progress)
    result |= {"history": history, "seconds": time.perf_counter() - t0, "train_seconds": train_s,
               "score_seconds": score_s, "out": None if last is None else str(last)}
    if verbose:
        held = "test" if split == "test" else "val"
        print(f"fine-tune {Path(str(checkpoint)).name} on {dataset}: {cfg.steps} steps × {cfg.batch_size} "
              f"({result['n_train']} train images), {held} split of {result['n_test']}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    return result


def tune(obj: Objective, data: Images, cfg: FinetuneCfg, dev: torch.device, out: Path | None, result: dict,
         progress: bool) -> tuple[list[dict], Path | None, float, float]:
    """The fine-tuning run through the shared loop, into ``out`` (None: no run folder); ``result``
    (its settings) is kept with the checkpoint, its ``metrics`` filled by the scoring -> (the logged
    rows, the checkpoint, seconds of training, seconds of the last scoring)."""
    train_cfg = train_settings(cfg, resolve_precision(cfg.precision, dev))
    view = ViewAugment(size=obj.backbone.img_size, crop_scale=cfg.crop_scale, flip_p=cfg.flip_p, jitter_p=0.0,
                       gray_p=0.0, mean=obj.image_mean, std=obj.image_std)
    torch.manual_seed(cfg.seed)  # the head, drop-path, crops and mixing draw the same stream for every start
    classifier = Classifier(obj.backbone, len(data.classes)).to(dev)
    old_rates = set_drop_path(obj.backbone, cfg.drop_path)
    task = ClassifierTask(classifier, view, MixCut(cfg, len(data.classes)), obj.checkpoint_state)
    groups = layer_decay_groups(obj.backbone, classifier.head, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    run = make_run(task, [{k: v for k, v in g.items() if k != "names"} for g in groups], train_cfg,
                   batches(data.train, data.train_labels, cfg.batch_size, cfg.seed), dev)
    score = Scoring(classifier, data, obj, dev, train_cfg.precision, cfg, result["metrics"], progress)
    if cfg.score_start:
        result["metrics"]["start_top1"] = score.measure()["top1"]
    history: list[dict] = []
    run.knob = ""  # the messages name fine-tuning's settings as they are given: lr=...
    hooks = [Monitoring(score, task, cfg.steps), Health(run, tqdm.write),
             Log(run, cfg.log_every, open_run(out, obj), history, lr=step_lrs(run))]
    if out is not None:
        hooks.append(Checkpoint(run, out, cfg.steps, lambda: saved_state(obj, classifier.head, data.classes, result)))
    t = time.perf_counter()
    try:
        last = train(run, hooks, progress)
    finally:
        set_drop_path(obj.backbone, old_rates)
    score_s = history[-1].get("monitor_s", 0.0)
    return history, last, time.perf_counter() - t - score_s, score_s


def open_run(out: Path | None, obj: Objective) -> MetricLog | None:
    """The run folder's config.yaml (the recipe of the backbone, so that it loads as any run) and
    metrics.jsonl; None without one."""
    if out is None:
        return None
    log = MetricLog(out, 0)
    runs.write_recipe(out, obj.recipe)
    return log


def saved_state(obj: Objective, head: nn.Linear, classes: Sequence[str], result: dict) -> dict:
    """What a fine-tuning checkpoint keeps beside its training state: the pre-training recipe, the
    head, the classes, and the run's settings and scores (``finetune``: what marks a fine-tuning run)."""
    return {"recipe": obj.recipe.model_dump(mode="json"), "finetune": dict(result),
            "head": {k: v.detach() for k, v in head.state_dict().items()}, "classes": list(classes)}


def default_out(checkpoint: str | Path, dataset: str, recipe: str | None = None) -> Path:
    """runs/finetune/<run name or scratch-RECIPE>-<dataset>."""
    if str(checkpoint) == SCRATCH:
        name = f"{SCRATCH}-{Path(recipe or DEFAULT_RECIPE).stem}"
    else:
        try:
            name = ckpt.find(Path(checkpoint)).parent.parent.name
        except FileNotFoundError:
            name = Path(checkpoint).name
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in dataset.replace("folder:", "").strip("/"))
    return Path("runs") / "finetune" / f"{name}-{slug}"
