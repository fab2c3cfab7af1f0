"""What the benchmarks share: the trainer's step built through m3i's own set-up, the peers' step
beside it, timing, synthetic data, the eval sets and their scores, overrides and tables.

Run from this folder (``python benchmarks/NAME.py``) the scripts import it as ``common``."""
from __future__ import annotations

import functools
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


# -- time --------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA step returns before it is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device) -> float:
    """Seconds of one call of ``fn``, its device work included."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def mean_seconds(fn: Callable, device: torch.device, calls: int = 3) -> float:
    """Mean seconds of ``calls`` calls of ``fn`` after one of warm-up."""
    times = [timed(fn, device) for _ in range(calls + 1)]
    return float(np.mean(times[1:]))


# -- the steps timed -------------------------------------------------------------------------------
class StagedStep:
    """A step called again and again on one batch: ``stage()`` is the host's share (drawn view
    parameters, masks, caption inputs), ``run(staged)`` the device's. Called, it does both, as the
    loop does every step; ``staged()`` is the device's share alone, the host's done once."""

    def __init__(self, stage: Callable, run: Callable):
        self.stage, self.run = stage, run

    def __call__(self):
        return self.run(self.stage())

    def staged(self) -> Callable:
        return functools.partial(self.run, self.stage())


def trainer_step(recipe, device: torch.device, num_classes: int, captions: list[str] = ()):
    """``recipe``'s training step as ``m3i pretrain`` builds it (:mod:`m3i.train.setup`: the
    precision resolved, the objective on ``device``, ``train.compile``, fused AdamW, its warm-up
    and cosine schedule, the step), with no data and no run folder -> the set-up's ``Run``.
    ``captions``: what a frozen text tower embeds up front."""
    from m3i.train import setup
    from m3i.train.dryrun import Captions

    recipe = setup.with_precision(recipe, device)
    torch.manual_seed(0)
    objective = setup.make_objective(recipe, num_classes, device)
    objective.prepare(Captions(list(captions)), progress=False)
    return setup.ready_run(recipe, objective, device)


def m3i_step(run, batch) -> StagedStep:
    """The trainer's step of ``run`` (a set-up ``Run``) on ``batch``, staged as the loop stages it;
    each call is the next step and returns its loss."""
    count = itertools.count()
    return StagedStep(lambda: run.task.stage(batch, run.device), lambda staged: run.step(staged, next(count)).loss)


class PeerViews:
    """The views m3i's view stage makes of ``images`` (uint8, on their device) for a peer: the
    parameters drawn on the host, applied on the device, as m3i's own step gets them; the first
    ``count`` views (None: every view of the recipe)."""

    def __init__(self, objective, images: torch.Tensor, count: int | None = None):
        self.augs, self.images = list(objective.augment)[:count], images

    def draw(self) -> list[dict]:
        from m3i.batch import to_device

        b, c, h, w = self.images.shape
        return [to_device(aug.draw(b, c, h, w), self.images.device) for aug in self.augs]

    def apply(self, drawn: list[dict]) -> list[torch.Tensor]:
        x = self.images.float() / 255
        return [aug.apply(x, d)[0] for aug, d in zip(self.augs, drawn)]


class PeerUpdate:
    """A peer's optimiser step, the same for every peer: the loss under bf16 autocast, fused AdamW
    (lr 1e-4, betas 0.9/0.95, weight decay 0.05), gradients clipped at 1.0."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)

    def __call__(self, loss_of: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss


def timm_vit(img_size: int, patch: int, width: int, depth: int, heads: int, num_classes: int = 0) -> nn.Module:
    """timm's own ViT (``num_classes`` 0: no head)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                             num_classes=num_classes)


# -- data ------------------------------------------------------------------------------------------
def random_batch(n: int, size: int, classes: int, caption: str = "a picture number {}", seed: int = 0) -> dict:
    """``n`` random uint8 images of ``size`` px, labels below ``classes`` and short numbered captions."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
            "label": torch.randint(0, classes, (n,), generator=g),
            "caption": [caption.format(i) for i in range(n)]}


def photo(rng: np.random.Generator, w: int, h: int):
    """A synthetic photo-like image (a smooth colour field with grain): JPEG decoding time depends
    on the pixel count, not the content."""
    from PIL import Image

    field = rng.uniform(0, 255, (h // 32 + 2, w // 32 + 2, 3)).astype(np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def label_classes(recipe) -> int:
    """The classes of the recipe's data where a term predicts labels (else 0: no class table)."""
    from m3i.train.setup import build_mixture

    return build_mixture(recipe).num_classes if any(t.target.kind == "label" for t in recipe.terms) else 0


# -- overrides ---------------------------------------------------------------------------------------
def text_tower_overrides(recipe: str, tower: str | None) -> list[str]:
    """Put every caption term of ``recipe`` on another text tower (``scratch`` where the MiniLM
    weights are not installed)."""
    from m3i.config import load_recipe

    if not tower:
        return []
    return [f"terms.{i}.target_encoder.tower={tower}" for i, t in enumerate(load_recipe(recipe).terms)
            if t.target.kind == "caption"]


def mix_override(part: str, new: str) -> str:
    """``data.sources=[...]``: the built-in mix with ``part`` of each spec replaced by ``new``
    (``:train`` -> ``:fit``), as one key=value override."""
    from m3i.config import builtin_mix

    sources = [s.model_dump() | {"spec": s.spec.replace(part, new)} for s in builtin_mix()]
    return "data.sources=" + json.dumps(sources)


def fit_mix() -> str:
    """The built-in mix on the ``fit`` part of each set (for choices made on ``val``), as one override."""
    return mix_override(":train", ":fit")


# -- runs and scores ----------------------------------------------------------------------------------
def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process, this checkout's m3i first on its path."""
    path = [str(ROOT / "src")] + [x for x in [os.environ.get("PYTHONPATH")] if x]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}


def run_parallel(fn, calls: list[tuple], jobs: int, done, catch: bool = False) -> None:
    """``done(fn(*args))`` for every ``args`` of ``calls``, in order; with ``jobs`` > 1 in that many
    spawned processes. ``catch``: a call that raises is printed and skipped, the others still run."""
    def each(results):
        for args, get in results:
            try:
                done(get())
            except Exception as e:
                if not catch:
                    raise
                print(f"{args[0]}: {type(e).__name__}: {e}", flush=True)

    if jobs <= 1:
        each((args, lambda args=args: fn(*args)) for args in calls)
        return
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        each([(args, pool.submit(fn, *args).result) for args in calls])


def metrics(run: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def pretrain_metrics(recipe, device: str | None = None) -> list[dict]:
    """``recipe`` through the real trainer into a folder that is removed after -> its metrics rows."""
    from m3i.train.loop import pretrain

    with tempfile.TemporaryDirectory() as d:
        pretrain(recipe, d, device=device, progress=False)
        return metrics(d)


def steady_img_per_s(rows: list[dict], batch: int, skip: int = 4) -> float:
    """Images/s from the step after ``skip`` to the end: the trainer's meter averages from the first
    step, start-up included."""
    first, end = (rows[min(skip, len(rows) - 2)] if len(rows) > 1 else rows[0]), rows[-1]
    t_first, t_end = first["step"] * batch / first["img_per_s"], end["step"] * batch / end["img_per_s"]
    return (end["step"] - first["step"]) * batch / (t_end - t_first) if t_end > t_first else end["img_per_s"]


def evalsets_of(tasks: dict, limit: int | None, split: str = "test", size: int = 32) -> dict:
    """The eval sets of ``tasks`` ({name: (task, dataset, metric)}), each loaded once, keyed by
    (dataset, whether its train part is loaded: the probes' tasks)."""
    from m3i.eval.run import load_evalset

    evalsets = {}
    for task, dataset, _ in tasks.values():
        key = (dataset, task in ("knn", "linear"))
        if key not in evalsets:
            evalsets[key] = load_evalset(dataset, size, with_train=key[1], split=split,
                                         limit=limit if dataset == "fashion-mnist" else None, progress=False)
    return evalsets


def score_tasks(model, tasks: dict, evalsets: dict) -> dict[str, float | None]:
    """Every task's headline number for ``model`` (a loaded run or ``pixels``); retrieval's R@1 is
    the mean of both directions, None where the model has no text tower."""
    from m3i.eval.run import PIXELS, score

    has_text = model != PIXELS and model.caption_term() is not None
    scores, features = {}, {}
    for name, (task, dataset, metric) in tasks.items():
        if task == "retrieval" and not has_text:
            scores[name] = None
            continue
        m = score(model, task, evalsets[(dataset, task in ("knn", "linear"))], False, features)["metrics"]
        scores[name] = (m["i2t_R@1"] + m["t2i_R@1"]) / 2 if metric == "R@1" else m[metric]
    return scores


# -- tables --------------------------------------------------------------------------------------------
def table_head(columns: list[str]) -> list[str]:
    """A markdown table's head row and rule."""
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def write_table(path: Path, lines: list[str]) -> None:
    """Write a table's lines to ``path`` and print them."""
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
