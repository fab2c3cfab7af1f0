"""What `train.precision auto` chooses here, and why: one training step of a recipe (forward and
backward on a synthetic batch, 1 warm-up then the mean of 3) in each format, side by side.

    python benchmarks/precision.py [--recipe m3i] [--batch 128] [--device cpu]

Prints per format the seconds per step, images/s and the ratio to fp32, and writes
results/precision-<device>.json. On a CPU without native bfloat16 (AVX2 only), bf16 autocast is
emulated and many times slower than fp32; with AVX512-BF16 or AMX it is the faster one.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from common import label_classes, mean_seconds
from m3i.config import load_recipe
from m3i.device import autocast_for, native_bf16, resolve_device, resolve_precision
from m3i.objective import Objective
from m3i.train.dryrun import Captions, synthetic_batch


def step_seconds(obj: Objective, data, dev: torch.device, precision: str) -> float:
    """A forward and backward pass in ``precision``: the mean of 3 after one of warm-up."""
    def step():
        with autocast_for(dev, precision):
            loss = obj(data).loss
        loss.backward()

    return mean_seconds(step, dev)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="m3i")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="JSON path (default results/precision-<device>.json)")
    a = p.parse_args()
    dev = resolve_device(a.device)
    recipe = load_recipe(a.recipe, overrides=[f"data.batch_size={a.batch}", "data.num_workers=0"])
    classes = label_classes(recipe)
    torch.manual_seed(0)
    obj = Objective(recipe, classes).to(dev).train()
    batch = synthetic_batch(recipe, a.batch, classes)
    obj.prepare(Captions(batch.captions), progress=False)
    data = batch.to(dev)
    formats = ["fp32", "bf16"] + (["fp16"] if dev.type == "cuda" else [])
    secs = {f: step_seconds(obj, data, dev, f) for f in formats}
    cpu = platform.processor() or platform.machine()
    res = {"recipe": a.recipe, "batch": a.batch, "device": str(dev), "cpu": cpu, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "native_bf16": native_bf16(dev),
           "auto": resolve_precision("auto", dev),
           "formats": {f: {"s_per_step": s, "img_per_s": a.batch / s, "vs_fp32": secs["fp32"] / s}
                       for f, s in secs.items()}}
    print(f"{a.recipe}, batch {a.batch}, {dev} ({torch.get_num_threads()} threads), native bf16: "
          f"{res['native_bf16']}, auto -> {res['auto']}")
    print(f"{'format':8s} {'s/step':>8s} {'img/s':>8s} {'speed vs fp32':>14s}")
    for f, r in res["formats"].items():
        print(f"{f:8s} {r['s_per_step']:8.2f} {r['img_per_s']:8.1f} {r['vs_fp32']:13.2f}×")
    out = Path(a.out or f"results/precision-{dev.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
