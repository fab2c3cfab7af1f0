"""The training loop. It runs an objective that returns named loss terms and knows no recipe."""
from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .. import distributed as dist
from ..config import check_accum_steps
from ..config import Recipe
from ..data import Mixture, build_source
from ..device import autocast_for, resolve_device, resolve_precision
from ..objective import Objective
from ..weights import load_weights_into
from ..runs import checkpoint as ckpt
from .. import runs
from . import preflight, strategy, trackers
from ..runs.lock import RunLock
from .signals import Preemption, worker_init
from .step import BadSteps, Skips, TrainStep, keep_fused, make_optimizer, make_scaler
from .strategy import compile_blocks

SHARDED_OPTIMIZER = "optimizer"  # the checkpoint's folder of the sharded optimizer state (FSDP runs)


def build_mixture(recipe: Recipe, rank: int = 0, world_size: int = 1) -> Mixture:
    d = recipe.data
    sources = [build_source(s.spec, labels=s.labels, captions=s.captions) for s in d.sources]
    if d.batch_size % world_size:
        raise ValueError(f"data.batch_size: {d.batch_size} is the global batch; it must divide by the "
                         f"{world_size} ranks")
    if recipe.views.input_mode == "mix" and (d.batch_size // world_size) % 2:
        raise ValueError(f"data.batch_size: the 'mix' input pairs images on each rank, so the batch of each of the "
                         f"{world_size} ranks ({d.batch_size // world_size}) must be even")
    check_accum_steps(recipe.train.accum_steps, d.batch_size, world_size, recipe.views.input_mode == "mix")
    return Mixture(sources, [s.weight for s in d.sources], d.batch_size // world_size, d.image_size,
                   seed=recipe.train.seed, rank=rank, world_size=world_size, max_lost=d.max_lost,
                   read_retries=d.read_retries, retry_backoff=d.retry_backoff)


def lr_lambda(train):
    """Linear warm-up, then cosine to ``min_lr``; a factor of ``train.lr``."""
    floor = train.min_lr / train.lr

    def f(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


class MetricLog:
    """metrics.jsonl (one object per logged step) and the trackers of ``train.report_to``
    (TensorBoard, W&B, MLflow), written by rank 0."""

    def __init__(self, run_dir: Path, resume_step: int, recipe: Recipe | None = None):
        report_to = recipe.train.report_to if recipe is not None else ["tensorboard"]
        config = recipe.model_dump(mode="json") if recipe is not None else {}
        # the trackers first: one that cannot start leaves the run folder as it was
        self.trackers = trackers.open_trackers(report_to, run_dir, config, resume_step)
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


class TrainingError(RuntimeError):
    pass


def setup_device(device: str | None) -> torch.device:
    """The device of this rank; under torchrun (RANK set) the process group is started here, once
    per process (a second run in the process uses it again), and destroyed when the interpreter
    exits. Left to the interpreter's own teardown, gloo can abort the process: its worker threads
    still hold work whose tensors are freed while the interpreter is torn down ("terminate called
    without an active exception")."""
    dev = resolve_device(device)
    if "RANK" in os.environ and not dist.is_dist():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(_destroy_process_group)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return dev


def _destroy_process_group() -> None:
    if dist.is_dist():
        torch.distributed.destroy_process_group()


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


@contextmanager
def flush_subnormals(dev: torch.device):
    """On the CPU, treat subnormal floats as zero while training: x86 CPUs compute on them ~20x
    slower, and a run reaches them after a few hundred steps (the demo's step time rose from 0.23 s
    to 2.3 s by step 650 without this). The process-wide flag is put back afterwards."""
    if dev.type != "cpu":
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def pretrain(recipe: Recipe, out: str | Path, resume: str | Path | None = None, device: str | None = None,
             progress: bool = True, init_from: str | Path | None = None) -> Path:
    """Run ``recipe`` into ``out``; returns the final checkpoint directory.

    resume: a run or checkpoint directory to continue from (same recipe).
    init_from: start the backbone from another run's weights (a multi-stage pipeline's next stage).

    ``out`` is locked for the run (a second run into it is refused), and SIGTERM or Ctrl-C saves
    a checkpoint and returns (the run continues with ``resume=out``; see signals.py).
    """
    out = Path(out)
    recipe = preflight.with_absolute_paths(recipe)
    main = int(os.environ.get("RANK", 0)) == 0
    trackers.preflight(recipe.train.report_to)  # before any work: a tracker that cannot start is named now
    with RunLock(out) if main else nullcontext(), Preemption() as stop:
        dev = setup_device(device)
        with flush_subnormals(dev):
            return _pretrain(recipe, out, resume, dev, progress, init_from, stop)


def _pretrain(recipe: Recipe, out: Path, resume, dev: torch.device, progress, init_from,
              stop: Preemption) -> Path:
    rank, world = dist.rank(), dist.world_size()
    if (prec := resolve_precision(recipe.train.precision, dev)) != recipe.train.precision:
        if rank == 0:
            print(f"train.precision {recipe.train.precision}: {prec} on this {dev.type}")
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": prec})})
    tr = recipe.train
    torch.manual_seed(tr.seed)  # the same initial weights on every rank (FSDP keeps each rank's shard of them)
    preflight.check_memory(recipe, dev, world)
    mixture = build_mixture(recipe, rank, world)
    preflight.check_targets(recipe, mixture.sources)
    if rank == 0 and (note := preflight.size_note(recipe)):
        print(note)
    objective = Objective(recipe, mixture.num_classes).to(dev)
    if dev.type == "cuda":  # convolutional backbones run channels-last there
        for net in objective.encoders():
            net.use_channels_last()
    if world > 1:  # then a random stream of its own for each rank (augmentations, masks)
        torch.manual_seed(tr.seed + rank)
    objective.prepare(mixture, progress=progress and rank == 0)  # e.g. a frozen text tower embeds every caption once
    if init_from:
        start_from(objective, init_from)
    start, state = restore(objective, recipe, resume) if resume else (0, None)
    if start >= tr.steps:
        print(f"{out}: already at step {start} of {tr.steps}; nothing to do")
        return ckpt.find(out)
    mixture.start_step = start
    # each view cropped in the loader from the decoded original, its parameters from the step's generator
    mixture.views = objective.loader_views(tr.seed, rank, mixture.interpolation)
    if tr.compile:
        compile_blocks(objective)
    # DDP around the objective, or its parameters sharded in place (FSDP), under torchrun
    model: nn.Module = strategy.wrap(objective, dev, tr)
    opt, sched = make_schedule(objective, tr, state, resume)
    log = open_log(out, start, recipe, dev)  # before the run's files: a tracker that fails to start writes none
    try:
        if rank == 0:
            runs.write_recipe(out, recipe)
            preflight.write_classes(out, recipe, mixture)
        return train(recipe, objective, model, opt, sched, mixture, log, out, dev, start, state or {}, stop, progress)
    finally:
        if log:
            log.close()


def open_log(out: Path, start: int, recipe: Recipe, dev: torch.device) -> MetricLog | None:
    """Rank 0's metrics.jsonl and trackers. Every rank learns whether they started: a tracker that
    cannot start stops every rank, where the others would wait for rank 0 in a collective."""
    log, failed = None, None
    if dist.rank() == 0:
        try:
            log = MetricLog(out, start, recipe)
        except trackers.TrackerError as e:
            failed = e
    if dist.sum_over_ranks([failed is not None], dev)[0]:
        raise failed or trackers.TrackerError("train.report_to: a tracker could not start on rank 0 (its error "
                                              "says which and what to do)")
    return log


def start_from(objective: Objective, init_from: str | Path) -> None:
    """The backbone (and the EMA teacher) from another run's weights: a multi-stage pipeline's next stage."""
    weights = ckpt.load_weights(Path(init_from))
    backbone = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    load_weights_into(objective.backbone, backbone, f"{init_from}", optional_prefixes=("mask_token",))
    objective.sync_teacher()


def restore(objective: Objective, recipe: Recipe, resume: str | Path) -> tuple[int, dict]:
    """Weights and random state of the checkpoint to continue from -> (its step, its training state)."""
    rank, world = dist.rank(), dist.world_size()
    weights, state = ckpt.load(Path(resume))
    objective.load_checkpoint_state(weights, f"--resume {resume}")
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(rngs) == world:  # one state per rank; another world size keeps the fresh per-rank seeds
        ckpt.set_rng_state(rngs[rank])
    elif rank == 0:
        print(f"note: the checkpoint holds the random state of {len(rngs)} ranks, not {world}; not restored")
    if rank == 0 and state.get("recipe"):
        for line in runs.changes(state["recipe"], recipe, int(state["step"])):
            print(line)
    return int(state["step"]), state


def make_schedule(objective: Objective, tr, state: dict | None, resume) -> tuple:
    """AdamW over the objective's groups (after any sharding: the sharded parameters) and its
    warm-up + cosine schedule, with their state when resuming."""
    opt = make_optimizer(objective.param_groups(tr.weight_decay), tr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tr))
    if state is not None:
        if state["optimizer"] == SHARDED_OPTIMIZER:
            strategy.load_sharded_optimizer(objective, opt, ckpt.find(Path(resume)) / SHARDED_OPTIMIZER)
        elif strategy.is_sharded(objective):
            raise ValueError(f"--resume {resume}: train.strategy=fsdp resumes from checkpoints of FSDP runs (a "
                             f"sharded optimizer state); this one was written by a DDP or single-process run")
        else:
            opt.load_state_dict(state["optimizer"])
        keep_fused(opt)
        sched.load_state_dict(state["scheduler"])
    return opt, sched


def train(recipe: Recipe, objective: Objective, model: nn.Module, opt, sched, mixture: Mixture,
          log: MetricLog | None, out: Path, dev: torch.device, start: int, counted: dict, stop: Preemption,
          progress: bool) -> Path | None:
    """The steps from ``start`` to ``train.steps``: log (``log``, on rank 0), checkpoint, stop on SIGTERM
    or on too many bad steps in a row. ``counted``: skipped images and steps before the resumed checkpoint."""
    tr, world, main = recipe.train, dist.world_size(), dist.rank() == 0
    bar = tqdm(total=tr.steps, initial=start, disable=not (progress and main), unit="step", dynamic_ncols=True)
    objective.train()
    scaler = make_scaler(dev, tr.precision, counted.get("scaler"))
    bad = BadSteps(dev, total=int(counted.get("bad_steps", 0)), scaler=int(counted.get("scaler_skips", 0)))
    skips = Skips(bad, start, scaler)
    train_step = TrainStep(objective, model, opt, sched, tr, autocast_for(dev, tr.precision), bad, scaler)
    monitor = make_monitor(recipe, objective)
    # skipped images: this rank's since the start, summed over ranks where they are reported
    skipped_before, skipped = int(counted.get("skipped_images", 0)), 0
    last_good: Path | None = None  # on rank 0
    saved, meter, step = False, Throughput(dev), start
    batches = iter(make_loader(mixture, recipe, dev))
    try:
        for batch in batches:
            if step >= tr.steps:
                break
            skipped += int(batch["n_skipped"])
            # the host's share (view parameters, masks, caption inputs), copied pinned and non_blocking
            batch = objective.stage(batch, dev)
            outputs = train_step(batch, step)  # queued on the device: nothing read back here
            step += 1
            meter.images += len(batch["label"]) * world
            bar.update(1)
            evaluating = monitor is not None and (step % tr.eval_every == 0 or step == tr.steps)
            scores = meter.monitor(monitor, objective) if evaluating else {}
            logged = step % tr.log_every == 0 or step == tr.steps or evaluating
            saving = step % tr.ckpt_every == 0 or step == tr.steps
            # SIGTERM / Ctrl-C: one process sees it at once; ranks agree where they read the counters anyway
            stopping = stop.requested is not None and world == 1
            if not (logged or saving or stopping or step % tr.max_bad_steps == 0):
                continue
            worst = skips.read(step, tqdm.write if main else None)  # waits for the device
            if worst >= tr.max_bad_steps:
                raise TrainingError(too_many_bad(worst, step, last_good, tr.precision))
            # the counts of every rank (a collective: every rank reads the counters at the same steps)
            n_skipped, *n_terms = dist.sum_over_ranks([skipped] + [int(outputs["n_" + t.name]) for t in objective.terms],
                                                      dev)
            counters = {"skipped_images": skipped_before + n_skipped, **skips.counters()}
            if logged and main:
                log_step(log, bar, objective, outputs, step, sched, meter.rate(), counters, n_terms,
                         train_step.momentum, scores)
            stopping = stopping or (world > 1 and stop.agreed(dev))
            if (saving or stopping) and skips.in_row == 0:  # a skipped step leaves the last good checkpoint the latest
                last_good, saved = meter.apart(_save, out, step, objective, opt, sched, recipe, main, counters), True
            if stopping:
                if main:
                    print(f"{stop.requested or 'a stop signal to another rank'} at step {step}: saved {last_good}; "
                          f"continue with `m3i pretrain --resume {out}`")
                break
    finally:
        end_workers(batches)
        bar.close()
    finish(log, dev, skipped_before, skipped, saved, step - start, skips.faults - skips.faults_before, last_good)
    return last_good


def make_loader(mixture: Mixture, recipe: Recipe, dev: torch.device) -> torch.utils.data.DataLoader:
    # the loader draws its worker seed from its own generator, never from the global RNG that
    # augmentations and masks use, so a resumed run continues the same random stream
    workers = recipe.data.num_workers
    return torch.utils.data.DataLoader(mixture, batch_size=None, num_workers=workers,
                                       prefetch_factor=4 if workers else None, pin_memory=dev.type == "cuda",
                                       worker_init_fn=worker_init, generator=torch.Generator().manual_seed(recipe.train.seed))


def make_monitor(recipe: Recipe, objective: Objective):
    """The monitors of ``train.eval_every`` (None without), on every rank: a sharded backbone embeds
    with all of them."""
    if not recipe.train.eval_every:
        return None
    from ..eval.monitor import Monitor

    return Monitor(recipe, objective.backbone.img_size)


class Throughput:
    """Images per second of training alone, since the run (or its resumption) began: the monitors'
    and the checkpoints' time is left out, so img/s reads the same with ``train.eval_every`` as
    without; the monitors' own time is logged apart (``monitor_s``)."""

    def __init__(self, dev: torch.device):
        self.dev, self.images, self.aside = dev, 0, 0.0
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

    def monitor(self, monitor, objective: Objective) -> dict[str, float]:
        """The monitors' scores, and the seconds they took (``monitor_s``)."""
        return self.apart(monitor, objective) | {"monitor_s": self.took}

    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.t0 - self.aside, 1e-9)


def too_many_bad(worst: int, step: int, last_good: Path | None, precision: str) -> str:
    advice = "Lower train.lr or check the data"
    if precision == "fp16":  # the scaler's own skips are not counted here: these gradients overflow unscaled
        advice += ", or train in bf16 or fp32 (these gradients overflow float16 even at a loss scale below 1)"
    return (f"the loss or its gradients were not finite for {worst} steps in a row (by step {step}); stopping. "
            f"The last good checkpoint is {last_good or 'none yet'}. {advice}.")


def finish(log: MetricLog | None, dev: torch.device, skipped_before: int, skipped: int, saved: bool, steps: int,
           faults: int, last_good: Path | None) -> None:
    """After the last step, on every rank: the skipped images of every rank, the last checkpoint
    whole, and an error if none was written (every step that would have been saved was skipped)."""
    skipped = skipped_before + dist.sum_over_ranks([skipped], dev)[0]
    dist.barrier()  # the last checkpoint is whole when pretrain returns on any rank
    main = dist.rank() == 0
    if main and skipped:
        print(f"skipped {skipped} unreadable images (counted in {runs.METRICS}: skipped_images)")
    if not saved and steps:
        raise TrainingError(f"no checkpoint was written: {faults} of the {steps} steps had a loss or gradients that "
                            f"were not finite, the last one included; lower train.lr or check the data")
    if log:
        print("\n".join([f"checkpoint:  {last_good}"] + log.where()))


def log_step(log: MetricLog, bar, objective: Objective, outputs: dict, step: int, sched, rate: float,
             counters: dict, counts: list[int], momentum: float | None = None, scores: dict | None = None) -> None:
    """One metrics row; ``counters`` (skipped images and steps) and ``counts`` (samples per term)
    are those of every rank; ``scores``: the monitors' figures at this step."""
    names = [t.name for t in objective.terms]
    values = torch.stack([outputs["loss"].detach().float()] + [outputs[n].detach().float() for n in names]).tolist()
    terms = dict(zip(names, values[1:]))
    skipped = {k: v for k, v in counters.items() if k in ("skipped_images", "bad_steps", "scaler_skips")}
    rec = {"step": step, "loss": values[0], **terms, **{f"n_{n}": c for n, c in zip(names, counts)},
           "lr": sched.get_last_lr()[0], "img_per_s": rate, **skipped}
    if momentum is not None:
        rec["ema_momentum"] = momentum
    log.write(rec | (scores or {}))
    bar.set_postfix({"img/s": f"{rate:.0f}", "loss": f"{values[0]:.3f}", **{k: f"{v:.3f}" for k, v in terms.items()}},
                    refresh=False)


def _save(out: Path, step: int, objective: Objective, opt, sched, recipe: Recipe, main: bool,
          counters: dict | None = None) -> Path | None:
    """Every rank calls it. Sharded (FSDP): the weights gathered to rank 0 (model.safetensors, as
    any run's) and the optimizer state written by every rank, sharded."""
    extra, optimizer = None, None
    if strategy.is_sharded(objective):
        staging = out / "checkpoints" / f".step_{step:06d}.{SHARDED_OPTIMIZER}"
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        strategy.save_sharded_optimizer(objective, opt, staging)
        extra, optimizer = {SHARDED_OPTIMIZER: staging}, SHARDED_OPTIMIZER
    sharded = extra is not None
    weights = objective.checkpoint_state(strategy.full_state_dict(objective)) if sharded or main else {}
    rngs = [ckpt.rng_state()]
    if dist.world_size() > 1:
        gathered = [None] * dist.world_size()
        torch.distributed.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if not main:
        return None
    state = {"step": step, "optimizer": optimizer or opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": rngs if len(rngs) > 1 else rngs[0], "recipe": recipe.model_dump(mode="json"), **(counters or {})}
    return ckpt.save(out, step, weights, state, extra=extra)
