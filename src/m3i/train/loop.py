"""The training loop. It runs a task (an objective that returns named loss terms, or fine-tuning's
classifier) and knows no recipe: set-up is setup.py, and the log, checkpoints, the bad-step check,
preemption and the in-run monitor are hooks (hooks.py). Pre-training (here) and fine-tuning
(finetune.py) both run through :func:`train`."""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from tqdm import tqdm

from .. import distributed as dist
from .. import runs
from ..config import Recipe
from ..runs import checkpoint as ckpt
from ..runs.lock import RunLock
from . import preflight, setup, trackers
from .hooks import Checkpoint, Health, Hook, Log, MetricLog, Moment, Monitoring, Preempt, Throughput, TrainingError
from .setup import Run, build_mixture, lr_lambda
from .signals import Preemption

# build_mixture, lr_lambda and TrainingError live in setup.py and hooks.py; callers still import them from here
__all__ = ["pretrain", "train", "end_workers", "build_mixture", "lr_lambda", "TrainingError"]

# what an in-run monitor is made from: (recipe, image size) -> score(objective) -> {name: value}
MonitorFactory = Callable[[Recipe, int], Callable]


def pretrain(recipe: Recipe, out: str | Path, resume: str | Path | None = None, device: str | None = None,
             progress: bool = True, init_from: str | Path | None = None, monitor: MonitorFactory | None = None) -> Path:
    """Run ``recipe`` into ``out``; returns the final checkpoint directory.

    resume: a run or checkpoint directory to continue from (same recipe).
    init_from: start the backbone from another run's weights (a multi-stage pipeline's next stage).
    monitor: builds the monitor of ``train.eval_every`` (m3i pretrain passes m3i.eval.monitor.Monitor).

    ``out`` is locked for the run (a second run into it is refused), and SIGTERM or Ctrl-C saves
    a checkpoint and returns (the run continues with ``resume=out``; see signals.py).
    """
    out = Path(out)
    recipe = preflight.with_absolute_paths(recipe)
    main = int(os.environ.get("RANK", 0)) == 0
    trackers.preflight(recipe.train.report_to)  # before any work: a tracker that cannot start is named now
    if recipe.train.eval_every and monitor is None:
        raise ValueError(f"train.eval_every: {recipe.train.eval_every}, but pretrain was given no monitor; pass "
                         f"monitor=m3i.eval.monitor.Monitor (as m3i pretrain does), or set train.eval_every=0")
    with RunLock(out) if main else nullcontext(), Preemption() as stop:
        dev = setup.setup_device(device)
        with setup.flush_subnormals(dev):
            return _pretrain(recipe, out, resume, dev, progress, init_from, stop, monitor)


def _pretrain(recipe: Recipe, out: Path, resume, dev, progress: bool, init_from, stop: Preemption,
              monitor: MonitorFactory | None) -> Path:
    recipe = setup.with_precision(recipe, dev)
    objective, mixture = setup.build_objective(recipe, dev, progress, init_from)
    start, state = setup.restore(objective, recipe, resume) if resume else (0, None)
    if start >= recipe.train.steps:
        print(f"{out}: already at step {start} of {recipe.train.steps}; nothing to do")
        return ckpt.find(out)
    run = setup.build_run(recipe, objective, mixture, dev, start, state, resume)
    # on every rank (a sharded backbone embeds with all of them); its data sets load before any file is written
    score = monitor(recipe, objective.backbone.img_size) if recipe.train.eval_every else None
    log = setup.open_log(out, start, recipe, dev)  # before the run's files: a tracker that fails to start writes none
    try:
        if dist.rank() == 0:
            runs.write_recipe(out, recipe)
            preflight.write_classes(out, recipe, mixture)
        last = train(run, pretraining_hooks(run, recipe, out, log, stop, score), progress)
        if log:
            print("\n".join([f"checkpoint:  {last}"] + log.where()))
        return last
    finally:
        if log:
            log.close()


def pretraining_hooks(run: Run, recipe: Recipe, out: Path, log: MetricLog | None, stop: Preemption,
                      score: Callable | None) -> list[Hook]:
    """The monitor (first: its scores join the step's row), the bad-step check, the log, preemption
    and checkpoints (last: they keep what the others counted)."""
    tr = recipe.train
    saved = {"recipe": recipe.model_dump(mode="json")}
    monitors = [Monitoring(score, run.task, tr.eval_every)] if score is not None else []
    return [*monitors, Health(run, tqdm.write if dist.rank() == 0 else None),
            Log(run, tr.log_every, log), Preempt(stop, run.device, out), Checkpoint(run, out, tr.ckpt_every, lambda: saved)]


def train(run: Run, hooks: list[Hook], progress: bool = True) -> Path | None:
    """The steps from ``run.start`` to ``train.steps``. A step is queued on the device and nothing is
    read back; at a step where a hook is due, the counts of every rank are summed and every hook
    is called in order (hooks.py). Returns the newest checkpoint written (on rank 0)."""
    tr, main = run.train, dist.rank() == 0
    bar = tqdm(total=tr.steps, initial=run.start, disable=not (progress and main), unit="step", dynamic_ncols=True)
    at = Moment(run.start, tr.steps, Throughput(run.device), bar)
    run.task.train()
    # skipped images: this rank's since the start; before it, every rank's (what the checkpoint counted)
    skipped, before = 0, int(run.counted.get("skipped_images", 0))
    batches = iter(run.batches)
    try:
        for batch in batches:
            if at.step >= tr.steps:
                break
            images, lost = len(batch), batch.n_skipped
            skipped += lost
            at.meter.images += images * dist.world_size()
            # the host's share (view parameters, masks, caption inputs), copied pinned and non_blocking
            outputs = run.step(run.task.stage(batch, run.device), at.step)  # queued on the device: nothing read back
            at.step += 1
            bar.update(1)
            if not any(hook.due(at) for hook in hooks):
                continue
            # a collective: every rank stops at the same steps
            n_skipped, *at.counts = dist.sum_over_ranks([skipped] + [int(outputs.samples[t.name]) for t in run.task.terms],
                                                        run.device)
            at.outputs, at.counters = outputs, {"skipped_images": before + n_skipped}
            for hook in hooks:
                hook.on_step(at)
            if at.stop:
                break
    finally:
        end_workers(batches)
        bar.close()
    at.counters["skipped_images"] = before + dist.sum_over_ranks([skipped], run.device)[0]
    for hook in hooks:
        hook.on_end(at)
    return at.last_good


def end_workers(batches) -> None:
    """End a loader iterator's workers, on an error too: they ignore SIGTERM (signals.py), so the
    interpreter's exit, which terminates its daemon processes with it, could not end them. A worker
    that dies while ending (a native library aborting at its exit, say) is reported and the rest are
    ended: every batch the run trained on was read before, so the run, its checkpoints and any
    error already on its way stand as they are."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return
    try:
        shutdown()  # ends the workers still alive in its own clean-up, whatever a dead one raised
    except RuntimeError as e:
        warnings.warn(f"a data loader worker failed while the loader ended, after training had stopped "
                      f"reading from it ({e}); the run is not affected", RuntimeWarning, stacklevel=2)
