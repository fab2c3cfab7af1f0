"""The demo's training step on this CPU, in fp32 and in bf16, as shipped and with each speed lever,
side by side in one run.

    python benchmarks/demo_step.py [--pairs 6] [--levers channels_last compile]
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/demo_step.py    # a CPU without bfloat16 kernels, on one with them
    python benchmarks/demo_step.py --smoke                    # a tiny batch: that it runs, no figures to keep

The step is the demo's (``m3i pretrain`` with no arguments: the ``m3i`` recipe on ``resnet_nano``,
its batch and image size), built by the trainer's own set-up (``m3i.train.setup``) on a random
batch staged as the loop stages it: the three backbone passes, every term, the EMA teacher, fused
AdamW and its schedule. No loader: this is the model step alone.

Variants are every precision × lever (``as shipped`` first). Levers:
- ``channels_last``: the convolutional backbones in channels-last memory (what CUDA gets);
- ``compile``: ``train.compile=true`` (every stage block, head and loss through ``torch.compile``;
  its compile time is reported apart and left out of the rate).

All variants live in one process and run round-robin, one step each per round (the order rotating
each round), after 2 warm-up steps each, so that a busy machine slows them alike. Prints each
variant's images/s (the median over rounds) and its speed against fp32 as shipped, and writes
results/demo-step-<isa>.json (``isa``: ``bf16`` where the CPU has bfloat16 kernels, else ``fp32``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from common import ROOT, m3i_step, random_batch, table_head, trainer_step
from m3i.config import load_recipe
from m3i.device import native_bf16

LEVERS = ("channels_last", "compile")
CPU = torch.device("cpu")


def variant(precision: str, levers: tuple[str, ...], batch: dict, classes: int, smoke: bool):
    """The demo's step with ``precision`` and ``levers`` -> (the step, seconds spent compiling)."""
    ov = [f"train.precision={precision}", "train.steps=1000", "train.warmup_steps=0"]
    if "compile" in levers:
        ov.append("train.compile=true")
    if smoke:
        ov.append(f"data.batch_size={len(batch['label'])}")
    recipe = load_recipe("m3i", overrides=ov)
    run = trainer_step(recipe, CPU, classes, batch["caption"])
    if "channels_last" in levers:
        for net in run.task.encoders():
            net.use_channels_last()
    step = m3i_step(run, batch)
    t0 = time.perf_counter()
    step()  # the first step compiles, where it compiles
    return step, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=6, help="rounds timed (each variant one step per round)")
    p.add_argument("--levers", nargs="*", choices=LEVERS, default=list(LEVERS))
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--smoke", action="store_true", help="batch 8, 1 round: that it runs (writes only to --out)")
    p.add_argument("--out", help="JSON path (default results/demo-step-<isa>.json)")
    a = p.parse_args()
    demo = load_recipe("m3i")
    n = 8 if a.smoke else demo.data.batch_size
    rounds = 1 if a.smoke else a.pairs
    size = demo.data.image_size
    batch = random_batch(n, size, 10, caption="a photo of thing number {}")
    isa = "bf16" if native_bf16(CPU) else "fp32"
    combos = [(prec, ()) for prec in a.precisions] + [(prec, (lv,)) for lv in a.levers for prec in a.precisions]
    print(f"the demo's step: m3i on {demo.backbone.name}, batch {n} at {size} px, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}, native bf16: {isa == 'bf16'}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}")
    steps, compile_s = {}, {}
    for prec, levers in combos:
        key = (prec, levers)
        steps[key], compile_s[key] = variant(prec, levers, batch, 10, a.smoke)
        steps[key]()  # the second warm-up step
    times: dict[tuple, list[float]] = {k: [] for k in steps}
    keys = list(steps)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times[("fp32", ())])
    rows = []
    for (prec, levers), ts in times.items():
        s = statistics.median(ts)
        rows.append({"precision": prec, "lever": "+".join(levers) or "as shipped", "s_per_step": s,
                     "img_per_s": n / s, "vs_fp32_shipped": base / s, "first_step_s": compile_s[(prec, levers)],
                     "steps_timed": len(ts)})
    print("\n".join(table_head(["precision", "lever", "s/step", "img/s", "vs fp32 as shipped", "first step s"])))
    for r in rows:
        print(f"| {r['precision']} | {r['lever']} | {r['s_per_step']:.3f} | {r['img_per_s']:.0f} | "
              f"{r['vs_fp32_shipped']:.2f}x | {r['first_step_s']:.1f} |")
    if a.smoke and not a.out:
        return
    out = Path(a.out or ROOT / "results" / f"demo-step-{isa}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch": n, "image_size": size, "backbone": demo.backbone.name, "isa": isa,
                               "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
                               "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": rounds,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
