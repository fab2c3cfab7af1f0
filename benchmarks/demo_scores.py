"""The demo's backbone against raw pixels under every probe of the comparison, on the full test
splits, and fine-tuned against the same network from scratch: results/demo/scores.json and
results/demo/demo_vs_pixels.png (the README's demo table).

    m3i pretrain --out runs/demo                     # the demo
    python benchmarks/demo_scores.py --run runs/demo --wall-s 478

Protocol: Fashion-MNIST 60,000 train / 10,000 test probes (k-NN k=20, linear), emoji category and
subcategory linear probes and image-text retrieval, digits linear, the fashion-mnist-scenes dense
probe on 3,000 canvases, fine-tuning 200 steps × 64 images scored on the full test split, and
detection (docs/detection.md): the CenterNet head's box AP on 3,000 / 1,000 canvases, frozen and
fine-tuned (the fine-tuned columns against the same net from scratch, the frozen ones against pixels).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, metrics
from compare import (DENSE, FINETUNE, PIXELS, SCRATCH, detection_columns, finetune_top1, load_evalsets, score_all,
                     settings)

LABELS = {"fmnist_knn": "F-MNIST k-NN", "fmnist_linear": "F-MNIST linear", "emoji_cat_linear": "emoji cat.",
          "emoji_sub_linear": "emoji subcat.", "digits_linear": "digits (unseen)", DENSE[0]: "scenes mIoU",
          FINETUNE[0]: "F-MNIST fine-tuned",
          "fmnist_scenes_AP_frozen": "scenes AP, frozen", "emoji_sub_AP_frozen": "emoji subcat. AP, frozen",
          "emoji_sub_APr_frozen": "emoji subcat. AP_r, frozen", "fmnist_scenes_AP_finetuned": "scenes AP, fine-tuned",
          "emoji_sub_AP_finetuned": "emoji subcat. AP, fine-tuned", "emoji_sub_APr_finetuned": "emoji subcat. AP_r, fine-tuned"}


def baseline(scores: dict, task: str) -> float | None:
    """What the demo must beat on ``task``: raw pixels, or for fine-tuning the same net from scratch."""
    return scores[SCRATCH][task] if task == FINETUNE[0] or task.endswith("_finetuned") else scores[PIXELS][task]


def plot(scores: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(LABELS)
    base = [baseline(scores, t) for t in tasks]
    demo = [scores["demo"][t] for t in tasks]
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(12, 3.8))
    ax.bar(x - 0.2, [(v or 0) * 100 for v in demo], 0.4, label="demo backbone", color="tab:red")
    ax.bar(x + 0.2, [(v or 0) * 100 for v in base], 0.4, label="raw pixels (fine-tuning: from scratch)", color="black")
    ax.set_xticks(x, [LABELS[t] for t in tasks], rotation=20, ha="right")
    ax.set_ylabel("test top-1 / mIoU / box AP (%)")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("m3i demo (1,123 steps on 2 CPU cores) against raw pixels")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="the demo's run directory")
    p.add_argument("--wall-s", type=float, help="the demo's wall time, as measured around `m3i pretrain`")
    p.add_argument("--out", default=str(ROOT / "results" / "demo"))
    a = p.parse_args()
    cmp = settings(["--dense-limit", "3000", "--finetune-steps", "200", "--finetune-batch", "64",
                    "--finetune-test", "0", "--detection"])
    evalsets = load_evalsets(None, "test")
    scores = {"demo": score_all(a.run, evalsets, "cpu", cmp), PIXELS: score_all(PIXELS, evalsets, "cpu", cmp),
              SCRATCH: {FINETUNE[0]: finetune_top1(SCRATCH, cmp, "resnet"), **detection_columns(SCRATCH, cmp, "resnet")}}
    last = [r for r in metrics(a.run) if "img_per_s" in r][-1]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps({
        "protocol": "test splits, full sets: Fashion-MNIST 60,000 train / 10,000 test probes; emoji 1,528/383; "
                    "digits 1,438/359; fashion-mnist-scenes 3,000/1,000 canvases; fine-tuning 200 steps x 64 "
                    "images, full test; detection 3,000/1,000 canvases, CenterNet head, m3i eval's steps",
        **scores,
        "demo_run": {"command": "m3i pretrain", "steps": last["step"], "wall_s": a.wall_s,
                     "img_per_s": round(last["img_per_s"])}}, indent=1))
    plot(scores, out / "demo_vs_pixels.png")
    pct = lambda v: "  n/a" if v is None else f"{v * 100:5.1f}"
    for t in LABELS:
        print(f"{LABELS[t]:>30}: demo {pct(scores['demo'][t])}   baseline {pct(baseline(scores, t))}")
    print(f"retrieval R@1: {scores['demo']['emoji_retrieval_R@1']}")


if __name__ == "__main__":
    main()
