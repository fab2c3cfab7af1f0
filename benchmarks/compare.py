"""The paper's central comparison on real data: single-stage M3I against each single objective
and against a multi-stage pipeline, every one seeing the same number of images with the same
backbone.

    python benchmarks/compare.py                      # full: 2 seeds, ViT
    python benchmarks/compare.py --backbone convnext  # the convolutional family
    python benchmarks/compare.py --quick              # smoke form (minutes)

Writes OUT/results.json (every run and score), OUT/table.md (mean ± spread over seeds, and
the average rank) and OUT/<task>.png (one bar chart per task).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from m3i.config import load_recipe
from m3i.eval.run import load_evalset, load_trained, score
from m3i.train.loop import pretrain

RECIPES = ["supervised", "clip", "simclr", "mae", "sim", "multistage", "m3i"]
STAGES = ["sim", "clip", "supervised"]  # the multi-stage pipeline, each continuing from the last
TASKS = {  # name -> (task, dataset, metric)
    "fmnist_linear": ("linear", "fashion-mnist", "top1"),
    "fmnist_knn": ("knn", "fashion-mnist", "top1"),
    "emoji_sub_linear": ("linear", "emoji:subcategory", "top1"),
    "emoji_retrieval_R@1": ("retrieval", "emoji:subcategory", "R@1"),
}
BACKBONES = {
    "vit": ["backbone.name=vit_micro", "backbone.patch_size=4"],
    # a convolutional network cannot drop tokens: masked inputs use the mask-token fill
    "convnext": ["backbone.name=convnext_atto", "backbone.patch_size=8"],
}


def fit_mix_override(split: str = "fit") -> str:
    """``data.sources=[...]``: the built-in mix on the ``fit`` part of each set (for choices made
    on ``val``), as one key=value override."""
    from m3i.config import builtin_mix

    sources = [s.model_dump() | {"spec": s.spec.replace(":train", f":{split}")} for s in builtin_mix()]
    return "data.sources=" + json.dumps(sources)


def overrides_for(recipe: str, backbone: str, steps: int, batch: int, seed: int) -> list[str]:
    ov = BACKBONES[backbone] + [f"train.steps={steps}", f"data.batch_size={batch}", f"train.seed={seed}",
                                f"train.warmup_steps={max(1, steps // 10)}", f"train.ckpt_every={steps}",
                                f"train.log_every={max(1, steps // 20)}"]
    if backbone == "convnext" and load_recipe(recipe).views.input_mode == "drop":
        ov.append("views.input_mode=fill")
    return ov


def train(recipe: str, out: Path, backbone: str, steps: int, batch: int, seed: int,
          extra: list[str] = ()) -> tuple[Path, float]:
    t0 = time.perf_counter()
    if recipe != "multistage":
        r = load_recipe(recipe, overrides=overrides_for(recipe, backbone, steps, batch, seed) + list(extra))
        return pretrain(r, out, progress=False), time.perf_counter() - t0
    prev, per = None, steps // len(STAGES)
    for i, stage in enumerate(STAGES):
        n = per if i < len(STAGES) - 1 else steps - per * (len(STAGES) - 1)
        r = load_recipe(stage, overrides=overrides_for(stage, backbone, n, batch, seed))
        prev = pretrain(r, out / f"stage{i + 1}_{stage}", progress=False, init_from=prev)
    return prev, time.perf_counter() - t0


def load_evalsets(limit: int) -> dict:
    size = load_recipe("m3i").backbone.img_size
    evalsets = {}
    for task, dataset, _ in TASKS.values():
        key = (dataset, task in ("knn", "linear"))
        if key not in evalsets:
            evalsets[key] = load_evalset(dataset, size, with_train=key[1],
                                         limit=limit if dataset == "fashion-mnist" else None, progress=False)
    return evalsets


def score_all(checkpoint: Path, evalsets: dict) -> dict[str, float | None]:
    """Every task's headline number; None where the model has no text tower for retrieval."""
    obj = load_trained(checkpoint)
    has_text = any(t.cfg.target.kind == "caption" for t in obj.terms)
    scores, features = {}, {}
    for name, (task, dataset, metric) in TASKS.items():
        if task == "retrieval" and not has_text:
            scores[name] = None
            continue
        m = score(obj, task, evalsets[(dataset, task in ("knn", "linear"))], False, features)["metrics"]
        scores[name] = (m["i2t_R@1"] + m["t2i_R@1"]) / 2 if metric == "R@1" else m[metric]
    return scores


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evalsets = load_evalsets(args.limit)
    results = {"config": vars(args), "runs": []}
    res_path = out / "results.json"
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for recipe in args.recipes:
            ck, secs = train(recipe, out / "runs" / f"{recipe}-s{seed}", args.backbone, args.steps, args.batch, seed)
            row = {"recipe": recipe, "seed": seed, "train_seconds": secs,
                   "images": args.steps * args.batch, "scores": score_all(ck, evalsets)}
            results["runs"].append(row)
            print(json.dumps({k: row[k] for k in ("recipe", "seed", "train_seconds", "scores")}), flush=True)
            res_path.write_text(json.dumps(results, indent=2))
    return results


def summarise(results: dict, out: Path) -> str:
    runs, recipes = results["runs"], list(dict.fromkeys(r["recipe"] for r in results["runs"]))
    stats: dict[str, dict[str, tuple[float, float] | None]] = {}
    for rec in recipes:
        stats[rec] = {}
        for task in TASKS:
            vals = [r["scores"][task] for r in runs if r["recipe"] == rec and r["scores"][task] is not None]
            stats[rec][task] = (float(np.mean(vals)), float(np.std(vals))) if vals else None
    ranks = {rec: [] for rec in recipes}  # rank among the recipes that have the task
    for task in TASKS:
        have = sorted((rec for rec in recipes if stats[rec][task]), key=lambda r: -stats[r][task][0])
        for i, rec in enumerate(have):
            ranks[rec].append(i + 1)
    cfg = results["config"]
    lines = [f"Backbone: {cfg['backbone']}; {cfg['steps']} steps × batch {cfg['batch']} = "
             f"{cfg['steps'] * cfg['batch']:,} images per run; {cfg['seeds']} seed(s); mean ± std over seeds.", "",
             "| recipe | " + " | ".join(TASKS) + " | mean rank | train s |",
             "|---" * (len(TASKS) + 3) + "|"]
    for rec in recipes:
        cells = [f"{s[0] * 100:.1f} ± {s[1] * 100:.1f}" if s else "n/a" for s in stats[rec].values()]
        secs = np.mean([r["train_seconds"] for r in runs if r["recipe"] == rec])
        lines.append(f"| {rec} | " + " | ".join(cells) + f" | {np.mean(ranks[rec]):.2f} | {secs:.0f} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task in TASKS:
        have = [rec for rec in recipes if stats[rec][task]]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        means = [stats[r][task][0] * 100 for r in have]
        errs = [stats[r][task][1] * 100 for r in have]
        colors = ["tab:red" if r == "m3i" else "tab:gray" if r == "multistage" else "tab:blue" for r in have]
        ax.bar(have, means, yerr=errs, color=colors, capsize=3)
        ax.set_ylabel(f"{task} (%)")
        ax.set_title(f"{task} — {cfg['backbone']}, {cfg['steps'] * cfg['batch']:,} images per run")
        lo = min(means) - max(errs + [0]) - 5
        ax.set_ylim(max(0, lo), min(100, max(means) + max(errs + [0]) + 3))
        fig.tight_layout()
        fig.savefig(out / f"{task.replace('@', '')}.png", dpi=110)
        plt.close(fig)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke form: few steps, one seed, small eval sets")
    p.add_argument("--backbone", choices=list(BACKBONES), default="vit")
    p.add_argument("--recipes", nargs="+", default=RECIPES, choices=RECIPES)
    p.add_argument("--steps", type=int, help="optimiser steps per run (default 60; quick 6)")
    p.add_argument("--batch", type=int, help="global batch (default 128; quick 32)")
    p.add_argument("--seeds", type=int, help="seeds per recipe (default 2; quick 1)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (to split seeds across processes)")
    p.add_argument("--limit", type=int, help="Fashion-MNIST train images for the probes (default 10000; quick 2000)")
    p.add_argument("--out", help="output folder (default results/compare-<backbone>[-quick])")
    a = p.parse_args()
    quick = a.quick
    a.steps = a.steps or (6 if quick else 60)
    a.batch = a.batch or (32 if quick else 128)
    a.seeds = a.seeds or (1 if quick else 2)
    a.limit = a.limit or (2000 if quick else 10000)
    a.out = a.out or f"results/compare-{a.backbone}{'-quick' if quick else ''}"
    t0 = time.perf_counter()
    results = run(a)
    print(summarise(results, Path(a.out)))
    print(f"total {time.perf_counter() - t0:.0f} s; results in {a.out}")


if __name__ == "__main__":
    main()
