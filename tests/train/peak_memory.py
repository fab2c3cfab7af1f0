"""The most memory the CPU allocator holds during the trainer's first two steps, and the dry run's
plan for one process, both made in a process of its own: ``python peak_memory.py BATCH CLASSES
OVERRIDE...`` prints them as JSON for the ``m3i`` recipe with the overrides (nothing another test
left in a process counts). The peak: what was alive before the steps (weights, the batches),
counted storage by storage, plus the highest point of the profiler's record of every allocation
and free in the steps. The second step is the one the plan is for: AdamW's state exists, and the
first step's gradients live until its backward pass starts."""
from __future__ import annotations

import gc
import json
import sys
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.train import memory
from m3i.train.dryrun import synthetic_batch
from m3i.train.setup import ready_run


def live_bytes() -> int:
    """The bytes of every CPU tensor's storage alive now, each storage once."""
    with warnings.catch_warnings():  # isinstance on every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
            if t.device.type == "cpu" and not t.is_meta}
    return sum(seen.values())


def measured_peak(recipe, batch: int, classes: int) -> int:
    torch.manual_seed(0)
    objective = Objective(recipe, classes).train()
    run = ready_run(recipe, objective, torch.device("cpu"))
    batches = [objective.stage(synthetic_batch(recipe, batch, classes), torch.device("cpu")) for _ in range(2)]
    gc.collect()
    before = live_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for i, b in enumerate(batches):
            run.step(b, i)
    now = peak = 0
    for _, n in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"):
        now += n
        peak = max(peak, now)
    return before + peak


def planned(recipe, batch: int, classes: int) -> dict[str, float]:
    acts = memory.measure_activations(recipe, classes, lambda b: synthetic_batch(recipe, b, classes))
    with torch.device("meta"):
        params = memory.count_parameters(Objective(recipe, classes))
    return memory.per_rank(params, acts, "single", 1, batch, recipe.backbone.grad_checkpointing,
                           recipe.train.precision, recipe.train.accum_steps)


if __name__ == "__main__":
    batch, classes, *overrides = sys.argv[1:]
    recipe = load_recipe("m3i", overrides=overrides)
    plan = planned(recipe, int(batch), int(classes))
    print(json.dumps({"plan": plan, "peak": measured_peak(recipe, int(batch), int(classes))}))
