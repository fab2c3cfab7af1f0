"""How much training on the emoji test items inflated the emoji figures: the same pre-training
with the emoji source on all 1,911 emoji (as the built-in mix was before the split) and on the
train part only, both scored on the held-out test emoji.

    python benchmarks/leak.py [--backbone vit] [--steps 60] [--seeds 1]

Writes OUT/results.json and OUT/table.md (default results/leak-<backbone>).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import mix_override, table_head, write_table
from compare import BACKBONES, load_evalsets, score_all, train

TASKS = ["emoji_cat_linear", "emoji_sub_linear", "emoji_retrieval_R@1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=list(BACKBONES), default="vit")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out")
    a = p.parse_args()
    out = Path(a.out or f"results/leak-{a.backbone}")
    out.mkdir(parents=True, exist_ok=True)
    evalsets = load_evalsets(2000)
    rows = []
    for seed in range(a.seeds):
        for name, split in (("all emoji (before)", "all"), ("train emoji only (now)", "train")):
            t0 = time.perf_counter()
            ck, _ = train("m3i", out / "runs" / f"{split}-s{seed}", a.backbone, a.steps, a.batch, seed,
                          [mix_override("emoji:train", f"emoji:{split}")])
            scores = score_all(ck, evalsets)
            rows.append({"pretrained_on": name, "seed": seed, "scores": {t: scores[t] for t in TASKS},
                         "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps({"config": vars(a), "runs": rows}, indent=2))
    lines = [f"m3i recipe, {a.backbone}, {a.steps} steps × {a.batch}, {a.seeds} seed(s); scored on the test emoji", "",
             *table_head(["pre-trained on", *TASKS])]
    for name in dict.fromkeys(r["pretrained_on"] for r in rows):
        rs = [r for r in rows if r["pretrained_on"] == name]
        lines.append(f"| {name} | " + " | ".join(f"{sum(r['scores'][t] for r in rs) / len(rs) * 100:.1f}"
                                                 for t in TASKS) + " |")
    write_table(out / "table.md", lines)


if __name__ == "__main__":
    main()
