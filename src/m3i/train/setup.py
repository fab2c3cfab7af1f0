"""Setting a run up, apart from the loop that runs it (loop.py): the device, the data, the
objective, what a checkpoint restores, the optimizer with its schedule, and the step. Pre-training
and fine-tuning (finetune.py) both end in a :class:`Run`, which the one loop trains."""
from __future__ import annotations

import atexit
import math
import os
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import distributed as dist
from .. import runs
from ..backbones.layouts import from_timm
from ..config import Recipe, TrainCfg, check_accum_steps
from ..data import Mixture, build_source
from ..device import autocast_for, resolve_device, resolve_precision
from ..objective import Objective
from ..runs import checkpoint as ckpt
from ..weights import load_weights_into
from . import preflight, strategy, trackers
from .hooks import MetricLog
from .signals import worker_init
from .step import BadSteps, Skips, TrainStep, keep_fused, make_optimizer, make_scaler
from .strategy import compile_blocks


@dataclass
class Run:
    """A run ready for the loop. ``task`` is what it trains: ``stage(batch, device)``, ``terms``
    (the named loss terms its outputs hold beside ``loss``, with ``n_<term>`` samples each),
    ``update_teacher`` and ``checkpoint_state``, as an :class:`~m3i.objective.Objective` answers
    them; ``model`` is what the step calls: ``task`` itself, DDP around it, or it sharded in place.
    ``counted``: what the checkpoint it resumes from had counted (skipped images, bad steps);
    ``knob``: how its messages name a setting (``train.lr``; fine-tuning's ``lr``)."""

    task: nn.Module
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    step: TrainStep
    skips: Skips
    batches: Iterable[dict]
    device: torch.device
    train: TrainCfg
    start: int = 0
    counted: dict = field(default_factory=dict)
    knob: str = "train."
    compiled: int = 0  # the pieces ``train.compile`` compiled (0: none)


def make_run(task: nn.Module, groups: list[dict], train: TrainCfg, batches: Iterable[dict], dev: torch.device,
             model: nn.Module | None = None, start: int = 0, state: dict | None = None, resume=None) -> Run:
    """The optimizer over ``groups`` and its schedule, fp16's gradient scaler, the bad-step
    counters and the step of ``task``; with ``state`` (resuming), as the checkpoint left them."""
    opt, sched = make_schedule(task, groups, train, state, resume)
    counted = state or {}
    scaler = make_scaler(dev, train.precision, counted.get("scaler"))
    bad = BadSteps(dev, total=int(counted.get("bad_steps", 0)), scaler=int(counted.get("scaler_skips", 0)))
    step = TrainStep(task, model or task, opt, sched, train, autocast_for(dev, train.precision), bad, scaler)
    return Run(task, model or task, opt, sched, step, Skips(bad, start, scaler), batches, dev, train, start, counted)


def lr_lambda(train):
    """Linear warm-up, then cosine to ``min_lr``; a factor of ``train.lr``. A warm-up longer than
    the run is cut short: the run ends while the rate still rises."""
    floor = train.min_lr / train.lr

    def f(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def make_schedule(task: nn.Module, groups: list[dict], train: TrainCfg, state: dict | None, resume) -> tuple:
    """AdamW over ``groups`` (after any sharding: the sharded parameters) and its warm-up + cosine
    schedule, with their state when resuming."""
    opt = make_optimizer(groups, train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
    if state is not None:
        if state["optimizer"] == ckpt.SHARDED_DIR:
            strategy.load_sharded_optimizer(task, opt, ckpt.find(Path(resume)) / ckpt.SHARDED_DIR)
        elif strategy.is_sharded(task):
            raise ValueError(f"--resume {resume}: train.strategy={train.strategy} resumes from checkpoints of FSDP or "
                             f"HSDP runs (a sharded optimizer state); this one was written by a DDP or single-process run")
        else:
            opt.load_state_dict(state["optimizer"])
        keep_fused(opt)
        sched.load_state_dict(state["scheduler"])
    return opt, sched


# ---------------------------------------------------------------------------------------------
# pre-training


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


def with_precision(recipe: Recipe, dev: torch.device) -> Recipe:
    """The recipe with ``train.precision`` resolved for ``dev`` (auto -> what it computes well), said once."""
    prec = resolve_precision(recipe.train.precision, dev)
    if prec == recipe.train.precision:
        return recipe
    if dist.rank() == 0:
        print(f"train.precision {recipe.train.precision}: {prec} on this {dev.type}")
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": prec})})


def build_objective(recipe: Recipe, dev: torch.device, progress: bool,
                    init_from: str | Path | None = None) -> tuple[Objective, Mixture]:
    """The recipe's checks, its data and its objective on ``dev``, each rank on its own random stream."""
    tr, rank, world = recipe.train, dist.rank(), dist.world_size()
    torch.manual_seed(tr.seed)  # the same initial weights on every rank (FSDP keeps each rank's shard of them)
    preflight.check_memory(recipe, dev, world)
    mixture = build_mixture(recipe, rank, world)
    preflight.check_targets(recipe, mixture.sources)
    if rank == 0 and (note := preflight.size_note(recipe)):
        print(note)
    objective = make_objective(recipe, mixture.num_classes, dev)
    if world > 1:  # then a random stream of its own for each rank (augmentations, masks)
        torch.manual_seed(tr.seed + rank)
    objective.prepare(mixture, progress=progress and rank == 0)  # e.g. a frozen text tower embeds every caption once
    if init_from:
        start_from(objective, init_from)
    return objective, mixture


def make_objective(recipe: Recipe, num_classes: int, dev: torch.device) -> Objective:
    """The recipe's objective on ``dev``, as training runs it."""
    objective = Objective(recipe, num_classes).to(dev)
    if dev.type == "cuda":  # convolutional backbones run channels-last there
        for net in objective.encoders():
            net.use_channels_last()
    return objective


def build_run(recipe: Recipe, objective: Objective, mixture: Mixture, dev: torch.device, start: int = 0,
              state: dict | None = None, resume=None) -> Run:
    """Pre-training's :class:`Run` from step ``start``: the loader, then the objective's step
    (:func:`ready_run`)."""
    mixture.start_step = start
    # each view cropped in the loader from the decoded original, its parameters from the step's generator
    mixture.views = objective.loader_views(recipe.train.seed, dist.rank(), mixture.interpolation)
    return ready_run(recipe, objective, dev, make_loader(mixture, recipe, dev), start, state, resume)


def ready_run(recipe: Recipe, objective: Objective, dev: torch.device, batches: Iterable = (), start: int = 0,
              state: dict | None = None, resume=None) -> Run:
    """The objective compiled (``train.compile``) and wrapped (DDP or FSDP under torchrun), with its
    optimizer, schedule and step: a :class:`Run` over ``batches``. Without batches, the trainer's
    step to call on batches staged by hand, ``run.step(objective.stage(batch, dev), i)``, with no
    loader and no run folder (what the benchmarks time)."""
    tr = recipe.train
    compiled = compile_blocks(objective) if tr.compile else 0
    model = strategy.wrap(objective, dev, tr)  # DDP around the objective, or its parameters sharded in place
    groups = objective.param_groups(tr.weight_decay)
    run = make_run(objective, groups, tr, batches, dev, model, start, state, resume)
    run.compiled = compiled
    return run


def make_loader(mixture: Mixture, recipe: Recipe, dev: torch.device) -> torch.utils.data.DataLoader:
    # the loader draws its worker seed from its own generator, never from the global RNG that
    # augmentations and masks use, so a resumed run continues the same random stream
    workers = recipe.data.num_workers
    return torch.utils.data.DataLoader(mixture, batch_size=None, num_workers=workers,
                                       prefetch_factor=4 if workers else None, pin_memory=dev.type == "cuda",
                                       worker_init_fn=worker_init, generator=torch.Generator().manual_seed(recipe.train.seed))


def start_from(objective: Objective, init_from: str | Path) -> None:
    """The backbone (and the EMA teacher) from other weights: another m3i run's (a multi-stage
    pipeline's next stage), or a released backbone in timm's layout (a ``.safetensors`` file, or a
    ``timm-dir`` folder of config.json and model.safetensors) to continue pre-training. The terms'
    heads start fresh; one line says what was loaded and what was not."""
    path, where = Path(init_from), f"--init-from {init_from}"
    weights, layout = init_weights(path)
    if layout == "m3i":
        backbone = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
        dropped = []
    else:
        backbone, dropped = from_timm(objective.backbone, weights, where)
    load_weights_into(objective.backbone, backbone, where, optional_prefixes=("mask_token",))
    objective.sync_teacher()
    if dist.rank() == 0:
        fresh = [t.name for t in objective.terms if any(p.requires_grad for p in t.parameters())]
        count = sum(v.numel() for v in backbone.values())
        print(f"{where}: loaded the {objective.recipe.backbone.name} backbone ({len(backbone)} tensors, {count / 1e6:.1f} M "
              f"parameters) from {'an m3i run' if layout == 'm3i' else 'weights in timm' + chr(39) + 's layout'}"
              + (f"; left out the file's classifier ({', '.join(dropped)})" if dropped else "")
              + (f"; starting fresh: the heads of the terms {', '.join(fresh)}" if fresh else ""))


def init_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors ``--init-from`` names and their layout: ``m3i`` (a run, a checkpoint, or its
    weights file) or ``timm`` (a safetensors file of timm names, a ``timm-dir`` folder)."""
    released = path.is_dir() and (path / "config.json").is_file() and (path / ckpt.MODEL_FILE).is_file()
    file = path / ckpt.MODEL_FILE if released else path
    in_checkpoint = ckpt.as_folder(file) != file and (file.parent / ckpt.STATE_FILE).is_file()
    if file.is_file() and file.suffix == ".safetensors" and not in_checkpoint:
        tensors = ckpt.read_tensors(file)
        return tensors, "m3i" if any(k.startswith("backbone.") for k in tensors) else "timm"
    return ckpt.load_weights(path), "m3i"


def restore(objective: Objective, recipe: Recipe, resume: str | Path) -> tuple[int, dict]:
    """Weights and random state of the checkpoint to continue from -> (its step, its training state)."""
    rank, world = dist.rank(), dist.world_size()
    weights, state = ckpt.load(Path(resume))
    if "finetune" in state:  # its optimizer is over the head and the layer-decay groups
        raise ValueError(f"--resume {resume}: a fine-tuning run (m3i finetune) is not continued by pre-training; "
                         f"start from its weights with --init-from {resume}")
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


def open_log(out: Path, start: int, recipe: Recipe, dev: torch.device) -> MetricLog | None:
    """Rank 0's metrics.jsonl and trackers. Every rank learns whether they started: a tracker that
    cannot start stops every rank, where the others would wait for rank 0 in a collective."""
    log, failed = None, None
    if dist.rank() == 0:
        try:
            log = MetricLog(out, start, recipe.train.report_to, recipe.model_dump(mode="json"))
        except trackers.TrackerError as e:
            failed = e
    if dist.sum_over_ranks([failed is not None], dev)[0]:
        raise failed or trackers.TrackerError("train.report_to: a tracker could not start on rank 0 (its error "
                                              "says which and what to do)")
    return log


# ---------------------------------------------------------------------------------------------
# the process


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

