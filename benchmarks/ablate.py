"""Ablations of the m3i recipe at the comparison's budget: which targets help which task, and
what the mixed input costs or buys. Each variant is the m3i recipe plus overrides.

    python benchmarks/ablate.py [--backbone vit] [--steps 100] [--batch 128] [--seeds 1]

Writes OUT/results.json and OUT/table.md (default results/ablate-<backbone>).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import table_head, write_table
from compare import TASKS, load_evalsets, score_all, train

VARIANTS = {
    "m3i": [],
    "drop input instead of mix": ["views.input_mode=drop"],
    "no caption term": ["terms.2.weight=0"],
    "no category term": ["terms.1.weight=0"],
    "no dense term": ["terms.0.weight=0"],
    "global targets from the unmasked view": ["terms.1.source.masked=false", "terms.2.source.masked=false"],
    "paired dense targets (the paper's assignment)": ["terms.0.target.paired=true"],
    "no global view term": ["terms.3.weight=0"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--limit", type=int, default=10000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out")
    a = p.parse_args()
    out = Path(a.out or f"results/ablate-{a.backbone}")
    out.mkdir(parents=True, exist_ok=True)
    evalsets = load_evalsets(a.limit)
    rows = []
    for seed in range(a.seeds):
        for i, name in enumerate(a.variants):
            t0 = time.perf_counter()
            ck, secs = train("m3i", out / "runs" / f"v{i}-s{seed}", a.backbone, a.steps, a.batch, seed, VARIANTS[name])
            rows.append({"variant": name, "overrides": VARIANTS[name], "seed": seed, "train_seconds": secs,
                         "scores": score_all(ck, evalsets)})
            print(json.dumps(rows[-1]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
            (out / "results.json").write_text(json.dumps({"config": vars(a), "runs": rows}, indent=2))
    lines = [f"m3i ablations, backbone {a.backbone}, {a.steps} steps × batch {a.batch}, {a.seeds} seed(s)", "",
             *table_head(["variant", *TASKS, "train s"])]
    for name in a.variants:
        rs = [r for r in rows if r["variant"] == name]
        cells = []
        for t in TASKS:
            v = [r["scores"][t] for r in rs if r["scores"][t] is not None]
            cells.append(f"{np.mean(v) * 100:.1f}" if v else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean([r['train_seconds'] for r in rs]):.0f} |")
    write_table(out / "table.md", lines)


if __name__ == "__main__":
    main()
