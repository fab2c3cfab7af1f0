"""What exact gradient accumulation (``train.accum_steps``) costs: one training step of a batch of
B in K micro-batches of B/K against one pass of B, side by side in one process (the steps
interleaved, best of several rounds, so a busy machine slows them alike).

    PYTHONPATH=src python benchmarks/accumulation.py [--recipe m3i] [--batch 32] [--ks 1 2 4] [--rounds 3] [overrides...]

(the overrides are added to a small ViT in fp32 with the scratch text tower: ``DEFAULTS``). Each
K's step is the trainer's own (``m3i.train.setup``), built with no data and no run folder.

Prints, for each K, the time of a step and its peak memory, and their ratios to K = 1. Peak
memory is what the step allocates above what it starts with: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the allocations minus the frees of one step, in
order, from ``torch.profiler``'s memory record (one extra step per K, not timed). The pass without
gradient runs the online side once more (the target encoders only once): about 4/3 of the
compute at best, more where small micro-batches use the hardware less well.
"""
from __future__ import annotations

import argparse

import torch

from common import m3i_step, random_batch, sync, text_tower_overrides, timed, trainer_step
from m3i.config import load_recipe

DEFAULTS = ["backbone.name=vit_micro", "train.precision=fp32"]  # and the caption terms on the scratch tower


def peak_bytes(step, device: torch.device) -> int:
    """The most ``step`` (a call of the trainer's step) holds at once above what it starts with."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    held = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):  # each op's own allocations, frees too
        held += e.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def best_times(steps: dict, rounds: int, device: torch.device) -> dict[int, float]:
    """Per K, the fastest of ``rounds`` steps, the Ks interleaved in every round."""
    for st in steps.values():  # warm-up
        st()
    sync(device)
    best = {k: float("inf") for k in steps}
    for _ in range(rounds):
        for k, st in steps.items():
            best[k] = min(best[k], timed(st, device))
    return best


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
    ov = DEFAULTS + text_tower_overrides(a.recipe, "scratch") + a.overrides + [f"data.batch_size={a.batch}"]
    recipe = load_recipe(a.recipe, overrides=ov)
    batch = random_batch(a.batch, recipe.data.image_size, 10)
    runs = {k: trainer_step(recipe.model_copy(update={"train": recipe.train.model_copy(update={"accum_steps": k})}),
                            device, 10, batch["caption"]) for k in a.ks}
    # each K's step on the batch staged once, as the loop stages it before the step
    steps = {k: m3i_step(run, batch).staged() for k, run in runs.items()}
    best = best_times(steps, a.rounds, device)
    peak = {k: peak_bytes(st, device) for k, st in steps.items()}
    base = a.ks[0]
    params = sum(p.numel() * p.element_size() for p in runs[base].step.params)
    print(f"{a.recipe} ({recipe.backbone.name}, {recipe.data.image_size} px), batch {a.batch}, {device.type}, "
          f"{torch.get_num_threads()} threads, best of {a.rounds} interleaved rounds; trainable parameters "
          f"{params / 2**20:.1f} MiB (their gradients are part of every step's peak)")
    for k in a.ks:
        print(f"  K={k}: {best[k] * 1e3:7.0f} ms/step ({best[k] / best[base]:.2f}x K={base}), "
              f"peak {peak[k] / 2**20:7.1f} MiB ({peak[k] / peak[base]:.2f}x K={base})")


if __name__ == "__main__":
    main()
