"""What the training loop does besides its steps, as hooks: the in-run monitor, the bad-step
check (health), the metrics log, preemption and checkpoints.

A step reads nothing back from the device. A hook whose ``due(at)`` is true at a step makes the
loop stop there: it reads the counters once and calls ``on_step(at)`` of every hook, in order;
after the last step, ``on_end(at)``. Where the loop stops is the same on every rank (the counters
are summed over ranks there). The hooks share one :class:`Moment`.
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import distributed as dist
from .. import runs
from ..runs import checkpoint as ckpt
from . import strategy, trackers
from .signals import Preemption


class TrainingError(RuntimeError):
    pass


class Throughput:
    """Images per second of training alone, since the run (or its resumption) began: the monitors'
    and the checkpoints' time is left out, so img/s reads the same with ``train.eval_every`` as
    without; the monitors' own time is logged apart (``monitor_s``)."""

    def __init__(self, dev: torch.device):
        self.dev, self.images, self.aside, self.took = dev, 0, 0.0, 0.0
        self.t0 = time.perf_counter()

    def apart(self, work, *args):
        """``work(*args)``, its time left out of the training time (``self.took``). The steps queued
        before it finish first, on training's clock."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        t = time.perf_counter()
        result = work(*args)
        self.took = time.perf_counter() - t
        self.aside += self.took
        return result

    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.t0 - self.aside, 1e-9)


@dataclass
class Moment:
    """What the loop and its hooks share. At a step where the loop stops: the step's ``outputs``
    (device tensors), the samples of each term (``counts``) and the ``counters`` (skipped images
    and steps) of every rank, and the bad steps ``in_row`` now."""

    step: int
    steps: int
    meter: Throughput
    bar: object = None  # the progress bar (tqdm)
    outputs: dict = field(default_factory=dict)
    counts: list[int] = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    in_row: int = 0
    scores: dict = field(default_factory=dict)  # the monitor's, at this step
    stop: bool = False  # asked to stop (a checkpoint, then the run returns)
    last_good: Path | None = None  # the newest checkpoint written (on rank 0)

    @property
    def last(self) -> bool:
        return self.step == self.steps

    def every(self, n: int) -> bool:
        return self.step % n == 0 or self.last


class Hook:
    def due(self, at: Moment) -> bool:
        return False

    def on_step(self, at: Moment) -> None:
        pass

    def on_end(self, at: Moment) -> None:
        pass


class Monitoring(Hook):
    """The caller's in-run evaluation (``score(task) -> {name: value}``, e.g. m3i.eval.monitor's
    Monitor) every ``every`` steps and at the last, on every rank; its scores join that step's
    metrics row, its time is logged apart (``monitor_s``) and left out of img/s."""

    def __init__(self, score: Callable[[nn.Module], dict], task: nn.Module, every: int):
        self.score, self.task, self.n = score, task, every

    def due(self, at: Moment) -> bool:
        return at.every(self.n)

    def on_step(self, at: Moment) -> None:
        at.scores = {}
        if self.due(at):
            at.scores = at.meter.apart(self.score, self.task) | {"monitor_s": at.meter.took}


class Health(Hook):
    """The bad-step counters read at every stop (waits for the device), what they count since the
    last read told to ``say``; ``max_bad_steps`` in a row with a loss or gradients not finite stop
    the run (the last good checkpoint stays the latest)."""

    def __init__(self, run, say: Callable[[str], None] | None):
        self.run, self.skips, self.max_bad, self.say = run, run.skips, run.train.max_bad_steps, say

    def due(self, at: Moment) -> bool:
        return at.step % self.max_bad == 0

    def on_step(self, at: Moment) -> None:
        worst = self.skips.read(at.step, self.say)
        if worst >= self.max_bad:
            raise TrainingError(too_many_bad(worst, at.step, at.last_good, self.run.train.precision, self.run.knob))
        at.in_row = self.skips.in_row
        at.counters.update(self.skips.counters())


def too_many_bad(worst: int, step: int, last_good: Path | None, precision: str, knob: str = "train.") -> str:
    advice = f"Lower {knob}lr or check the data"
    if precision == "fp16":  # the scaler's own skips are not counted here: these gradients overflow unscaled
        advice += ", or train in bf16 or fp32 (these gradients overflow float16 even at a loss scale below 1)"
    return (f"the loss or its gradients were not finite for {worst} steps in a row (by step {step}); stopping. "
            f"The last good checkpoint is {last_good or 'none yet'}. {advice}.")


class MetricLog:
    """metrics.jsonl (one object per logged step) and the trackers of ``report_to`` (TensorBoard,
    W&B, MLflow), written by rank 0."""

    def __init__(self, run_dir: Path, resume_step: int, report_to=(), config: dict | None = None):
        # the trackers first: one that cannot start leaves the run folder as it was
        self.trackers = trackers.open_trackers(list(report_to), run_dir, config or {}, resume_step)
        self.path = run_dir / runs.METRICS
        if resume_step and self.path.exists():  # drop lines past the checkpoint we resume from
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif not resume_step:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.trackers = trackers.log_all(self.trackers, record, record["step"])

    def where(self) -> list[str]:
        """Where the run's records are: metrics.jsonl and each tracker's, one line each."""
        return [f"metrics:     {self.path}"] + [t.where() for t in self.trackers]

    def close(self) -> None:
        for line in trackers.close_all(self.trackers):
            warnings.warn(line, RuntimeWarning, stacklevel=2)
        self.trackers = []


class Log(Hook):
    """A metrics row every ``every`` steps, at the last and where the monitor scored: the loss and
    each term's with its samples, the learning rate (``lr(step)``; default: the schedule's after the
    step), img/s, the skipped counts; to ``log`` (rank 0's :class:`MetricLog`) and ``history``."""

    def __init__(self, run, every: int, log: MetricLog | None, history: list | None = None, lr=None):
        self.run, self.n, self.log, self.history = run, every, log, history
        self.lr = lr or (lambda step: run.sched.get_last_lr()[0])

    def due(self, at: Moment) -> bool:
        return at.every(self.n)

    def on_step(self, at: Moment) -> None:
        if (self.due(at) or at.scores) and (self.log is not None or self.history is not None):
            row = self.row(at)
            if self.log is not None:
                self.log.write(row)
            if self.history is not None:
                self.history.append(row)

    def row(self, at: Moment) -> dict:
        names = [t.name for t in self.run.task.terms]
        values = torch.stack([at.outputs.loss.detach().float()] +
                             [at.outputs.terms[n].detach().float() for n in names]).tolist()
        terms, rate = dict(zip(names, values[1:])), at.meter.rate()
        skipped = {k: v for k, v in at.counters.items() if k in ("skipped_images", "bad_steps", "scaler_skips")}
        row = {"step": at.step, "loss": values[0], **terms, **{f"n_{n}": c for n, c in zip(names, at.counts)},
               "lr": self.lr(at.step), "img_per_s": rate, **skipped}
        if self.run.step.momentum is not None:
            row["ema_momentum"] = self.run.step.momentum
        if at.bar is not None:
            at.bar.set_postfix({"img/s": f"{rate:.0f}", "loss": f"{values[0]:.3f}",
                                **{k: f"{v:.3f}" for k, v in terms.items()}}, refresh=False)
        return row | at.scores

    def on_end(self, at: Moment) -> None:
        if self.log is not None and (n := at.counters.get("skipped_images")):
            print(f"skipped {n} unreadable images (counted in {runs.METRICS}: skipped_images)")


class Preempt(Hook):
    """SIGTERM or Ctrl-C (:class:`~m3i.train.signals.Preemption`): a checkpoint at the step reached,
    then the run returns. One process sees the signal at once; ranks agree at the loop's stops."""

    def __init__(self, stop: Preemption, dev: torch.device, out: Path):
        self.stop, self.dev, self.out = stop, dev, out

    def due(self, at: Moment) -> bool:
        return self.stop.requested is not None and dist.world_size() == 1

    def on_step(self, at: Moment) -> None:
        at.stop = self.due(at) or (dist.world_size() > 1 and self.stop.agreed(self.dev))

    def on_end(self, at: Moment) -> None:
        if at.stop and dist.rank() == 0:
            print(f"{self.stop.requested or 'a stop signal to another rank'} at step {at.step}: saved {at.last_good}; "
                  f"continue with `m3i pretrain --resume {self.out}`")


class Checkpoint(Hook):
    """A checkpoint into ``out`` every ``every`` steps, at the last and when the run stops, unless
    the step was skipped (a bad step leaves the last good checkpoint the latest). ``state()``: what
    the checkpoint keeps beside the training state (the recipe, ...). After the last step, every
    rank waits for it to be whole; a run that wrote none is an error."""

    def __init__(self, run, out: Path, every: int, state: Callable[[], dict]):
        self.run, self.out, self.n, self.state, self.saved = run, out, every, state, False

    def due(self, at: Moment) -> bool:
        return at.every(self.n)

    def on_step(self, at: Moment) -> None:
        if (self.due(at) or at.stop) and at.in_row == 0:
            at.last_good = at.meter.apart(save_checkpoint, self.out, at.step, self.run, self.state() | at.counters)
            self.saved = True

    def on_end(self, at: Moment) -> None:
        dist.barrier()  # the last checkpoint is whole when the run returns on any rank
        skips, steps = self.run.skips, at.step - self.run.start
        if not self.saved and steps:
            raise TrainingError(f"no checkpoint was written: {skips.faults - skips.faults_before} of the {steps} steps "
                                f"had a loss or gradients that were not finite, the last one included; lower "
                                f"{self.run.knob}lr or check the data")


def save_checkpoint(out: Path, step: int, run, state: dict) -> Path | None:
    """Every rank calls it; rank 0 writes (-> the checkpoint). Sharded (FSDP): the weights gathered
    to rank 0 (model.safetensors, as any run's) and the optimizer state written by every rank, sharded."""
    task, opt, main = run.task, run.opt, dist.rank() == 0
    extra, optimizer = None, None
    if strategy.is_sharded(task):
        staging = out / "checkpoints" / f".step_{step:06d}.{ckpt.SHARDED_DIR}"
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        strategy.save_sharded_optimizer(task, opt, staging)
        extra, optimizer = {ckpt.SHARDED_DIR: staging}, ckpt.SHARDED_DIR
    weights = task.checkpoint_state(strategy.full_state_dict(task)) if extra is not None or main else {}
    rngs = [ckpt.rng_state()]
    if dist.world_size() > 1:
        gathered = [None] * dist.world_size()
        torch.distributed.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if not main:
        return None
    state = {"step": step, "optimizer": optimizer or opt.state_dict(), "scheduler": run.sched.state_dict(),
             "rng": rngs if len(rngs) > 1 else rngs[0], **state}
    return ckpt.save(out, step, weights, state, extra=extra)
