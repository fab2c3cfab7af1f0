"""Training throughput of every recipe through the real trainer (data loading, views, objective,
optimizer, EMA), measured side by side in one run.

    python benchmarks/speed.py [--steps 25] [--backbone vit|convnext] [--recipes ...]

Prints images/s per recipe (the trainer's own meter, after a warm-up of 5 steps) and writes
results/speed-<backbone>.json.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from common import ROOT, pretrain_metrics, steady_img_per_s
from compare import BACKBONES, RECIPES, overrides_for
from m3i.config import load_recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--backbone", choices=list(BACKBONES), default="vit")
    p.add_argument("--recipes", nargs="+", default=[r for r in RECIPES if r != "multistage"] + ["mocov3", "byol",
                                                                                                "data2vec"])
    a = p.parse_args()
    rows = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}, backbone {a.backbone}")
    for name in a.recipes:
        ov = overrides_for(name, a.backbone, a.steps, a.batch, 0) + ["train.log_every=1"]
        if name == "data2vec" and a.backbone == "convnext":
            ov.append("terms.0.target_encoder.top_k=2")  # atto's last stage has two blocks
        t0 = time.perf_counter()
        lines = pretrain_metrics(load_recipe(name, overrides=ov))
        wall = time.perf_counter() - t0
        rate = steady_img_per_s(lines, a.batch)  # the images between step 5 and the end
        rows[name] = {"img_per_s": rate, "wall_s": wall}
        print(f"{name:<12} {rate:7.1f} img/s   ({wall:.0f} s for {a.steps} steps incl. start-up)", flush=True)
    out = ROOT / "results" / f"speed-{a.backbone}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "threads": torch.get_num_threads(), "recipes": rows}, indent=2))


if __name__ == "__main__":
    main()
