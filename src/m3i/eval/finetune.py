"""``m3i finetune``: end-to-end fine-tuning of the backbone f_θ with a classification head.

The protocol of BEiT, MAE and SIM, shortened for small budgets: AdamW with layer-wise
learning-rate decay (block i of L learns at ``lr · layer_decay^(L − i)``), linear warm-up then
cosine, drop-path, label smoothing, and MixUp / CutMix (kornia). ``scratch`` runs the same
schedule from a random initialisation: the baseline pre-training must beat.

The fine-tuned weights are written as an ordinary run (``config.yaml`` + ``checkpoints/``),
so ``m3i eval`` and ``m3i export`` load them; the head is saved with the training state (``optimizer.safetensors`` + ``state.json``).
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal
from collections.abc import Mapping, Sequence

import kornia.augmentation as KA
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from tqdm import tqdm

from ..backbones import Backbone
from ..device import resolve_device, resolve_precision
from ..layers import DropPath, no_weight_decay
from ..config import ConfigError, Strict, apply_override, load_recipe, validate
from ..objective import Objective
from ..runs import checkpoint as ckpt
from .. import runs
from ..train.loop import TrainingError, lr_lambda
from ..runs import load_run
from ..views import ViewAugment
from . import metrics
from .run import load_images, splits

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
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device has it (m3i.device)
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
    if cfg.warmup() > cfg.steps:
        raise ConfigError(f"finetune: warmup_steps: {cfg.warmup()} is more than the {cfg.steps} steps")
    if not 0 <= cfg.mixup_range[0] <= cfg.mixup_range[1] <= 1:
        raise ConfigError(f"finetune: mixup_range: expected 0 <= lo <= hi <= 1, got {list(cfg.mixup_range)}")
    if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        raise ConfigError(f"finetune: crop_scale: expected 0 < lo <= hi <= 1, got {list(cfg.crop_scale)}")
    return cfg, backbone


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


@torch.no_grad()
def accuracy(model: Classifier, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor, batch_size: int,
             autocast, progress: bool = False) -> dict[str, float]:
    """Top-1 / top-5 of the model on uint8 images (B, 3, S, S)."""
    was = model.training
    model.eval()
    dev = mean.device
    scores = []
    for i in tqdm(range(0, len(images), batch_size), desc="score", disable=not progress, leave=False):
        x = (images[i:i + batch_size].to(dev).float() / 255 - mean) / std
        with autocast():
            scores.append(model(x).float().cpu())
    model.train(was)
    return metrics.topk_accuracy(torch.cat(scores), labels)


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Index batches of exactly ``batch_size`` over 0..n-1: in order first (the loaded order is already
    a seeded shuffle), then a fresh permutation every further epoch."""
    stream = torch.arange(n)
    while True:
        while len(stream) < batch_size:
            stream = torch.cat([stream, torch.randperm(n, generator=gen)])
        yield stream[:batch_size]
        stream = stream[batch_size:]


def finetune(checkpoint: str | Path, dataset: str, steps: int | None = None,
             overrides: Sequence[str] | Mapping[str, Any] = (), recipe: str | None = None, split: str = "test",
             out: str | Path | None = None, device: str | None = None, progress: bool = True,
             seed: int | None = None, verbose: bool = True) -> dict:
    """Fine-tune ``checkpoint`` (a run, a checkpoint directory or ``scratch``) on ``dataset``.

    Trains on the train part (``split="val"``: on ``fit``) and scores the test part (``val``).
    Returns ``{"task": "finetune", "dataset", "split", "checkpoint", "metrics": {"top1", "top5"[,
    "start_top1"]}, "n_train", "n_test", "steps", "backbone", "config", "history", "seconds",
    "train_seconds", "score_seconds", "out"}``; with ``out``, the fine-tuned weights are written
    there as a run directory. ``seed`` (default 0) fixes the head, the data order, the crops and the
    mixing, and a scratch backbone's initialisation."""
    t0 = time.perf_counter()
    cfg, backbone_overrides = load_config(overrides, steps=steps, seed=seed)
    dev = resolve_device(device)
    tr_src, tr_idx, te_src, te_idx, classes = splits(dataset, split)
    num_classes = len(classes)
    if num_classes < 2:
        raise ValueError(f"--dataset {dataset}: fine-tuning needs at least two classes, got {num_classes}")
    obj = initial_model(checkpoint, num_classes, recipe, backbone_overrides, cfg.seed)
    backbone = obj.backbone
    size = backbone.img_size

    # data: the first steps·batch images of a seeded shuffle of the train part (all of it if that is less)
    rng = np.random.default_rng(cfg.seed)
    tr_idx = rng.permutation(tr_idx)[: cfg.steps * cfg.batch_size]
    if cfg.test_limit:
        te_idx = np.sort(rng.choice(te_idx, min(cfg.test_limit, len(te_idx)), replace=False))
    tr_img, tr_y, _ = load_images(tr_src, tr_idx, size, progress)
    te_img, te_y, _ = load_images(te_src, te_idx, size, progress)

    mean = torch.tensor(obj.image_mean, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(obj.image_std, device=dev).view(1, -1, 1, 1)
    view = ViewAugment(size=size, crop_scale=cfg.crop_scale, flip_p=cfg.flip_p, jitter_p=0.0, gray_p=0.0,
                       mean=obj.image_mean, std=obj.image_std)

    torch.manual_seed(cfg.seed)  # the head, drop-path, crops and mixing draw the same stream for every start
    model = Classifier(backbone, num_classes).to(dev)
    model.train()
    old_rates = set_drop_path(backbone, cfg.drop_path)
    mixcut = MixCut(cfg, num_classes)
    groups = layer_decay_groups(backbone, model.head, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=cfg.lr,
                            betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(_Schedule(cfg)))
    use_bf16 = resolve_precision(cfg.precision, dev) == "bf16"  # fp16 (auto on an old GPU) has no scaler here: fp32
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    result_metrics: dict[str, float] = {}
    if cfg.score_start:
        result_metrics["start_top1"] = accuracy(model, te_img, te_y, mean, std, cfg.eval_batch_size, autocast,
                                                progress)["top1"]

    history = []
    t_train = time.perf_counter()
    batches = _batches(len(tr_y), cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    bar = tqdm(range(cfg.steps), desc="finetune", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = next(batches)
        x, _, _ = view(tr_img[idx].to(dev).float() / 255)
        x, target = mixcut(x, tr_y[idx].to(dev))
        with autocast():
            logits = model(x)
        loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        if not torch.isfinite(loss):
            raise TrainingError(f"the fine-tuning loss is {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        lrs = [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
        bar.set_postfix({"loss": f"{loss.item():.3f}", "lr": f"{max(lrs):.2e}"}, refresh=False)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            history.append({"step": step + 1, "loss": loss.item(), "lr": lrs})
    bar.close()
    set_drop_path(backbone, old_rates)

    t_score = time.perf_counter()
    result_metrics.update(accuracy(model, te_img, te_y, mean, std, cfg.eval_batch_size, autocast, progress))
    seconds = {"train_seconds": t_score - t_train, "score_seconds": time.perf_counter() - t_score}
    held = "test" if split == "test" else "val"
    result = {"task": "finetune", "dataset": dataset, "split": split, "checkpoint": str(checkpoint),
              "metrics": result_metrics, "n_train": int(len(tr_y)), "n_test": int(len(te_y)), "steps": cfg.steps,
              "backbone": obj.recipe.backbone.name, "config": cfg.model_dump(mode="json"), "history": history,
              "seconds": time.perf_counter() - t0, **seconds, "out": None}
    if out is not None:
        result["out"] = str(save_run(out, obj.cpu(), model.head.cpu(), classes, result))
    if verbose:
        print(f"fine-tune {Path(str(checkpoint)).name} on {dataset}: {cfg.steps} steps × {cfg.batch_size} "
              f"({len(tr_y)} train images), {held} split of {len(te_y)}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in result_metrics.items()))
    return result


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


class _Schedule:
    """The fields ``lr_lambda`` reads, from a fine-tuning config."""

    def __init__(self, cfg: FinetuneCfg):
        self.steps, self.lr, self.min_lr, self.warmup_steps = cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup()


def save_run(out: str | Path, obj: Objective, head: nn.Linear, classes: Sequence[str], result: dict) -> Path:
    """Write the fine-tuned objective as a run directory (the format ``m3i eval`` / ``m3i export`` load)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs.write_recipe(out, obj.recipe)
    with (out / runs.METRICS).open("w") as f:
        for rec in result["history"]:
            f.write(json.dumps(rec) + "\n")
    state = {"step": result["steps"], "finetune": {k: v for k, v in result.items() if k not in ("history", "out")},
             "head": {k: v.detach().clone() for k, v in head.state_dict().items()}, "classes": list(classes)}
    return ckpt.save(out, result["steps"], obj.checkpoint_state(), state)
