"""Training throughput of every recipe through the real trainer (data loading, views, objective,
optimizer, EMA), measured side by side in one run.

    python benchmarks/speed.py [--steps 25] [--backbone vit|convnext] [--recipes ...]

Prints images/s per recipe (the trainer's own meter, after a warm-up of 5 steps) and writes
results/speed-<backbone>.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from compare import BACKBONES, RECIPES, overrides_for
from m3i.config import load_recipe
from m3i.train.loop import pretrain


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
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            pretrain(load_recipe(name, overrides=ov), d, progress=False)
            wall = time.perf_counter() - t0
            lines = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        # the meter averages from the first step; use the images between step 5 and the end
        s5, end = lines[4], lines[-1]
        t5 = s5["step"] * a.batch / s5["img_per_s"]
        t_end = end["step"] * a.batch / end["img_per_s"]
        rate = (end["step"] - s5["step"]) * a.batch / (t_end - t5)
        rows[name] = {"img_per_s": rate, "wall_s": wall}
        print(f"{name:<12} {rate:7.1f} img/s   ({wall:.0f} s for {a.steps} steps incl. start-up)", flush=True)
    out = Path(__file__).resolve().parents[1] / "results" / f"speed-{a.backbone}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "threads": torch.get_num_threads(), "recipes": rows}, indent=2))


if __name__ == "__main__":
    main()
