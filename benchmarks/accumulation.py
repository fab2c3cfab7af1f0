"""What exact gradient accumulation (``train.accum_steps``) costs: one training step of a batch of
B in K micro-batches of B/K against one pass of B, side by side in one process (the steps
interleaved, best of several rounds, so a busy machine slows them alike).

    PYTHONPATH=src python benchmarks/accumulation.py [--recipe m3i] [--batch 32] [--ks 1 2 4] [--rounds 3] [overrides...]

(the overrides are added to a small ViT in fp32 with the scratch text tower: ``DEFAULTS``)

Prints, for each K, the time of a step and its peak memory, and their ratios to K = 1. Peak
memory is what the step allocates above what it starts with: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the allocations minus the frees of one step, in
order, from ``torch.profiler``'s memory record (one extra step per K, not timed). The pass without
gradient runs the online side once more (the target encoders only once): about 4/3 of the
compute at best, more where small micro-batches use the hardware less well.
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.train.loop import lr_lambda
from m3i.device import autocast_for
from m3i.train.step import BadSteps, TrainStep, make_optimizer

DEFAULTS = ["backbone.name=vit_micro", "train.precision=fp32", "terms.2.target_encoder.tower=scratch"]


def step_fn(recipe, k: int, device: torch.device) -> TrainStep:
    train = recipe.train.model_copy(update={"accum_steps": k})
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=10).to(device)
    opt = make_optimizer(obj.param_groups(train.weight_decay), train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
    autocast = autocast_for(device, train.precision) if device.type == "cuda" else nullcontext()
    return TrainStep(obj, obj, opt, sched, train, autocast, BadSteps(device))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(step: TrainStep, batch: dict, device: torch.device) -> int:
    """The most the step holds at once above what it starts with."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step(batch, 1)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(batch, 1)
    held = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):  # each op's own allocations, frees too
        held += e.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="m3i")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", default=[])
    a = p.parse_args()
    device = torch.device(a.device)
    recipe = load_recipe(a.recipe, overrides=DEFAULTS + a.overrides + [f"data.batch_size={a.batch}"])
    g = torch.Generator().manual_seed(0)
    s = recipe.data.image_size
    batch = {"image": torch.randint(0, 256, (a.batch, 3, s, s), dtype=torch.uint8, generator=g),
             "label": torch.randint(0, 10, (a.batch,), generator=g),
             "caption": [f"a picture number {i}" for i in range(a.batch)]}
    steps = {k: step_fn(recipe, k, device) for k in a.ks}
    staged = {k: st.objective.stage(batch, device) for k, st in steps.items()}  # as the loop stages it, before the step
    for k, st in steps.items():  # warm-up
        st(staged[k], 0)
    sync(device)
    best = {k: float("inf") for k in a.ks}
    for _ in range(a.rounds):
        for k, st in steps.items():
            t0 = time.perf_counter()
            st(staged[k], 1)
            sync(device)
            best[k] = min(best[k], time.perf_counter() - t0)
    peak = {k: peak_bytes(st, staged[k], device) for k, st in steps.items()}
    base = a.ks[0]
    params = sum(p.numel() * p.element_size() for p in steps[base].params)
    print(f"{a.recipe} ({recipe.backbone.name}, {recipe.data.image_size} px), batch {a.batch}, {device.type}, "
          f"{torch.get_num_threads()} threads, best of {a.rounds} interleaved rounds; trainable parameters "
          f"{params / 2**20:.1f} MiB (their gradients are part of every step's peak)")
    for k in a.ks:
        print(f"  K={k}: {best[k] * 1e3:7.0f} ms/step ({best[k] / best[base]:.2f}x K={base}), "
              f"peak {peak[k] / 2**20:7.1f} MiB ({peak[k] / peak[base]:.2f}x K={base})")


if __name__ == "__main__":
    main()
