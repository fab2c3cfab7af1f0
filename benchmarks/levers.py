"""Levers of the demo, each measured on the validation split: the m3i recipe plus overrides,
pre-trained on the fit part of the built-in mix and scored on the val part (never on test).

    python benchmarks/levers.py --variants vit_micro resnet_nano --steps 300

Writes OUT/results.json and OUT/table.md (default results/levers): per variant the val scores,
the training seconds and images/s (measured one run after another, on an otherwise idle
machine unless the table says otherwise), beside raw pixels on the same splits.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import compare
from common import evalsets_of, fit_mix, run_parallel, score_tasks, table_head, text_tower_overrides, write_table

from m3i.config import load_recipe
from m3i.eval.run import PIXELS
from m3i.runs import load_run
from m3i.train.loop import pretrain

# name -> (task, dataset, metric), scored on the val split: the comparison's probes on the mix's sets
TASKS = {k: compare.TASKS[k] for k in ("fmnist_knn", "fmnist_linear", "emoji_cat_linear", "emoji_sub_linear")}
VARIANTS = {
    "vit_micro": ["backbone.name=vit_micro"],
    "vit_nano p8": ["backbone.name=vit_nano", "backbone.patch_size=8"],
    "convnext_atto stem 1": ["backbone.name=convnext_atto", "backbone.patch_size=8"],
    "resnet_nano": ["backbone.name=resnet_nano"],
    "resnet_micro": ["backbone.name=resnet_micro"],
    "resnet18": ["backbone.name=resnet18"],
}


def evalsets(limit: int | None) -> dict:
    return evalsets_of(TASKS, limit, "val")


def run_variant(name: str, a: argparse.Namespace, sets: dict | None = None) -> dict:
    """Pre-train one variant on the fit mix and score it on val."""
    ov = VARIANTS.get(name, name.split())  # a known variant, or overrides written out
    ov = (ov + a.extra + text_tower_overrides(a.recipe, a.text_tower)
          + [f"train.steps={a.steps}", f"train.ckpt_every={a.steps}", fit_mix()])
    recipe = load_recipe(a.recipe, overrides=ov)
    t0 = time.perf_counter()
    ck = pretrain(recipe, Path(a.out) / "runs" / run_dirname(name), progress=False, device=a.device)
    secs = time.perf_counter() - t0
    sets = sets or evalsets(a.limit)
    return {"variant": name, "recipe": a.recipe, "overrides": ov[:-1], "steps": a.steps, "device": a.device,
            "train_seconds": secs, "img_per_s": a.steps * recipe.data.batch_size / secs,
            "scores": score_tasks(load_run(ck, a.device), TASKS, sets)}


def run_dirname(name: str, limit: int = 80) -> str:
    """A file-system name for a variant: its overrides written out, or cut and hashed when too long."""
    safe = name.replace(" ", "_").replace("=", "-").replace("/", "-")
    if len(safe) <= limit:
        return safe
    return f"{safe[:limit - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every variant")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--recipe", default="m3i")
    p.add_argument("--limit", type=int, default=20000, help="Fashion-MNIST fit images for the probes")
    p.add_argument("--out", default="results/levers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="variants in parallel (processes)")
    p.add_argument("--text-tower", choices=["minilm", "scratch"], help="text tower of the caption terms")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {"runs": []}
    sets = evalsets(a.limit)
    if not any(r["variant"] == PIXELS for r in results["runs"]):
        results["runs"].append({"variant": PIXELS, "steps": 0, "scores": score_tasks(PIXELS, TASKS, sets)})

    def done(row: dict) -> None:
        results["runs"].append(row)
        print(json.dumps({k: row[k] for k in ("variant", "train_seconds", "img_per_s", "scores")}), flush=True)
        res_path.write_text(json.dumps(results, indent=2))

    run_parallel(run_variant, [(name, a, None if a.jobs > 1 else sets) for name in a.variants], a.jobs, done,
                 catch=a.jobs > 1)
    lines = table_head(["variant", "steps", *TASKS, "train s", "img/s"])
    for r in results["runs"]:
        if "scores" not in r:
            continue
        cells = " | ".join(f"{r['scores'][t] * 100:.1f}" for t in TASKS)
        lines.append(f"| {r['variant']} | {r.get('steps', '')} | {cells} | {r.get('train_seconds', 0):.0f} | "
                     f"{r.get('img_per_s', 0):.0f} |")
    write_table(out / "table.md", lines)


if __name__ == "__main__":
    main()
