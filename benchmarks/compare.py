"""The paper's central comparison on real data: single-stage M3I against each single objective,
against a multi-stage pipeline and against raw pixels, every recipe given the same training
budget with the same backbone and the same tuning (``benchmarks/tune.py``).

    python benchmarks/compare.py                          # ResNet, 2 seeds, the m3i demo's FLOPs
    python benchmarks/compare.py --budget images=230400   # the same images for every recipe instead
    python benchmarks/compare.py --backbone vit           # or convnext
    python benchmarks/compare.py --device cuda --jobs 4   # a GPU: 10 × the demo's FLOPs, runs in parallel
    python benchmarks/compare.py --quick                  # smoke form (minutes)
    python benchmarks/compare.py --recipes dino m3i-distill   # any shipped recipe, or a variant in benchmarks/variants/

The budget (``--budget``) is what every recipe gets the same of:
- ``flops=X``: training FLOPs. One step of each recipe is counted once with torch.utils.flop_counter
  (forward and backward of the online encoder, the teacher, the decoders and a trained text tower;
  ``m3i.train.dryrun.step_flops``) at the comparison's batch, and its step count is X over that.
  ``flops=demo`` is the ``m3i`` demo run's FLOPs on this backbone, ``flops=demo*10`` ten times that.
- ``images=N``: images seen (N / batch steps each);
- ``seconds=S``: training seconds, from each recipe's measured time per step on this machine.
``multistage`` splits its budget evenly over its stages.

Writes OUT/results.json (every run and score), OUT/table.md (mean ± spread over seeds, mean
rank, and each row's FLOPs, steps, images and training time) and OUT/<task>.png (one bar chart
per task). The ``pixels`` row scores the raw, standardised input with the same probes: the floor
every backbone must beat.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, also where this file is loaded by its path
from common import (evalsets_of, fit_mix, label_classes, mean_seconds, run_parallel, score_tasks,  # noqa: E402
                    table_head, text_tower_overrides)

from m3i.config import load_recipe, recipe_names  # noqa: E402
from m3i.eval.run import PIXELS  # noqa: E402
from m3i.runs import load_run  # noqa: E402
from m3i.train.loop import pretrain  # noqa: E402

RECIPES = ["supervised", "clip", "simclr", "mae", "sim", "multistage", "m3i"]  # the default rows
# recipes compared but not shipped (a variant of a shipped one), by their file's name
VARIANTS = Path(__file__).resolve().parent / "variants"


def recipe_ref(name: str) -> str:
    """What ``load_recipe`` takes for a row: a shipped recipe's name, or a variant's file."""
    path = VARIANTS / f"{name}.yaml"
    return str(path) if path.is_file() else name


def recipe_choices() -> list[str]:
    """Every row the comparison can run: the shipped recipes, ``multistage`` and the variants."""
    return sorted({*recipe_names(), "multistage", *(p.stem for p in VARIANTS.glob("*.yaml"))})
STAGES = ["sim", "clip", "supervised"]  # the multi-stage pipeline, each continuing from the last
TASKS = {  # name -> (task, dataset, metric)
    "fmnist_linear": ("linear", "fashion-mnist", "top1"),
    "fmnist_knn": ("knn", "fashion-mnist", "top1"),
    "emoji_cat_linear": ("linear", "emoji:category", "top1"),
    "emoji_sub_linear": ("linear", "emoji:subcategory", "top1"),
    "emoji_retrieval_R@1": ("retrieval", "emoji:subcategory", "R@1"),
    "digits_linear": ("linear", "digits", "top1"),  # an image kind no pre-training mix holds
}
# columns of their own protocols: the dense probe on frozen patch features, and fine-tuning
DENSE = ("fmnist_scenes_mIoU", "fashion-mnist-scenes")
FINETUNE = ("fmnist_finetune", "fashion-mnist")
SCRATCH = "scratch"  # the fine-tuning row from a random initialisation: what pre-training must beat
# detection (docs/detection.md, opt-in with --detection: minutes per row): COCO-style box AP on
# fashion-mnist-scenes, AP and LVIS's AP_r on the emoji subcategories, each as <column>_frozen and
# <column>_finetuned; pixels stand for both settings (nothing to fine-tune), scratch fills the fine-tuned ones
DETECTION = {"fmnist_scenes_AP": ("fashion-mnist-scenes", "AP"), "emoji_sub_AP": ("emoji-scenes:subcategory", "AP"),
             "emoji_sub_APr": ("emoji-scenes:subcategory", "AP_r")}
DETECTION_SETTINGS = ("frozen", "finetuned")
BACKBONES = {
    # the demo's backbone (stride 8), set for every recipe: the m3i recipe names it, the others inherit
    # the default stride 4, which would give them a stride-1 stem at 4 × the FLOPs per image
    "resnet": ["backbone.name=resnet_nano", "backbone.patch_size=8"],
    "vit": ["backbone.name=vit_micro", "backbone.patch_size=4"],
    # a convolutional network cannot drop tokens: masked inputs use the mask-token fill
    "convnext": ["backbone.name=convnext_atto", "backbone.patch_size=8"],
}


def tuned_overrides(recipe: str, tuned: dict) -> list[str]:
    return [f"{k}={v}" for k, v in tuned.get(recipe, {}).items()]


def overrides_for(recipe: str, backbone: str, steps: int, batch: int, seed: int, split: str = "test",
                  tuned: dict | None = None, workers: int | None = None, text_tower: str | None = None) -> list[str]:
    ov = BACKBONES[backbone] + [f"train.steps={steps}", f"data.batch_size={batch}", f"train.seed={seed}",
                                f"train.warmup_steps={max(1, steps // 10)}", f"train.ckpt_every={steps}",
                                f"train.log_every={max(1, steps // 20)}"]
    if not backbone == "vit" and load_recipe(recipe_ref(recipe)).views.input_mode == "drop":
        ov.append("views.input_mode=fill")
    if split == "val":
        ov.append(fit_mix())
    if workers is not None:
        ov.append(f"data.num_workers={workers}")
    return ov + text_tower_overrides(recipe, text_tower) + tuned_overrides(recipe, tuned or {})


def stages_of(recipe: str) -> list[str]:
    return list(STAGES) if recipe == "multistage" else [recipe]


def split_steps(recipe: str, steps: int) -> list[int]:
    """``steps`` in all, over the recipe's stages (``multistage``: evenly, the rest to the last)."""
    n = len(stages_of(recipe))
    return [steps // n] * (n - 1) + [steps - steps // n * (n - 1)]


def train(recipe: str, out: Path, backbone: str, steps: int | list[int], batch: int, seed: int,
          extra: list[str] = (), split: str = "test", tuned: dict | None = None, device: str | None = None,
          workers: int | None = None, text_tower: str | None = None) -> tuple[Path, float]:
    """Pre-train ``recipe`` (each stage of ``multistage`` continuing from the last); ``steps``: in
    all, or one count per stage."""
    t0 = time.perf_counter()
    kw = dict(split=split, tuned=tuned, workers=workers, text_tower=text_tower)
    per_stage = split_steps(recipe, steps) if isinstance(steps, int) else list(steps)
    prev, names = None, stages_of(recipe)
    for i, (stage, n) in enumerate(zip(names, per_stage, strict=True)):
        r = load_recipe(recipe_ref(stage), overrides=overrides_for(stage, backbone, n, batch, seed, **kw) + list(extra))
        where = out if len(names) == 1 else out / f"stage{i + 1}_{stage}"
        prev = pretrain(r, where, progress=False, init_from=prev, device=device)
    return prev, time.perf_counter() - t0


# -- budgets ---------------------------------------------------------------------------------
BUDGETS = ("flops", "images", "seconds")


def _number(text: str) -> float:
    """``text`` as a number; NaN where it is none (refused with the budget's own message)."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def parse_budget(text: str) -> tuple[str, float]:
    """``flops=X`` (a number, ``demo`` or ``demo*F``), ``images=N`` or ``seconds=S`` -> (kind,
    amount); ``demo`` is returned as the amount's factor, negative (resolved by :func:`plan`)."""
    kind, _, value = text.partition("=")
    if kind not in BUDGETS or not value:
        raise ValueError(f"--budget: expected flops=X, images=N or seconds=S, got {text!r}")
    if kind == "flops" and value.startswith("demo"):
        factor = value[len("demo"):]
        f = _number(factor[1:]) if factor.startswith("*") else 1.0 if not factor else float("nan")
        if not f > 0:
            raise ValueError(f"--budget: expected flops=demo or flops=demo*F with F > 0, got {text!r}")
        return kind, -f
    amount = _number(value)
    if not amount > 0:
        raise ValueError(f"--budget: {kind} must be a positive number, got {value!r}")
    return kind, amount


def stage_cost(stage: str, a: argparse.Namespace, kind: str, tuned: dict | None = None) -> float:
    """One training step of ``stage`` as the comparison runs it (with its ``tuned`` overrides, which
    may change its terms): its FLOPs, or its seconds on this machine (the mean of 3 steps after one
    of warm-up, on a synthetic batch)."""
    import torch

    from m3i.objective import Objective
    from m3i.train.dryrun import step_flops, synthetic_batch

    r = load_recipe(recipe_ref(stage), overrides=overrides_for(stage, a.backbone, 1, a.batch, 0, split=a.split, tuned=tuned,
                                                   text_tower=a.text_tower, workers=0))
    classes = label_classes(r)
    if kind == "flops":
        return float(step_flops(r, classes, a.batch))
    obj = Objective(r, classes).train()
    data = synthetic_batch(r, a.batch, classes)
    return mean_seconds(lambda: obj(data).loss.backward(), torch.device("cpu"))


def plan(a: argparse.Namespace, tuned: dict | None = None) -> dict[str, dict]:
    """Per recipe: the steps of each stage under the budget, and each stage's cost per step (with
    its ``tuned`` overrides)."""
    kind, amount = parse_budget(a.budget)
    unit = "flops" if kind != "seconds" else "seconds"
    counted: dict[tuple, float] = {}

    def cost(stage: str, own: dict | None = tuned) -> float:
        """``stage``'s step with the ``own`` overrides (None: as shipped), each setting counted once."""
        key = (stage, *tuned_overrides(stage, own or {}))
        if key not in counted:
            counted[key] = stage_cost(stage, a, unit, own)
        return counted[key]

    if kind == "flops" and amount < 0:  # the m3i demo run's FLOPs (its images at m3i's cost per image), times a factor
        demo = load_recipe("m3i")  # the demo as shipped, whatever the m3i row is tuned to
        amount = -amount * demo.train.steps * demo.data.batch_size * cost("m3i", None) / a.batch
    out = {}
    for recipe in a.recipes:
        names = stages_of(recipe)
        if kind == "images":
            steps = split_steps(recipe, max(len(names), round(amount / a.batch)))
        else:
            steps = [max(1, round(amount / len(names) / cost(stage))) for stage in names]
        # the FLOPs of every budget but seconds (whose costs are times)
        flops = sum(n * cost(st) for n, st in zip(steps, names)) if kind != "seconds" else None
        out[recipe] = {"stages": names, "steps": steps, "flops": flops}
    return {"kind": kind, "amount": amount, "recipes": out,
            f"{unit}_per_step": {st: cost(st) for each in out.values() for st in each["stages"]}}


def load_evalsets(limit: int | None, split: str = "test", size: int = 32) -> dict:
    """The eval sets of the comparison's tasks."""
    return evalsets_of(TASKS, limit, split, size)


def score_all(checkpoint: Path | str, evalsets: dict, device: str = "cpu", a: argparse.Namespace | None = None,
              backbone: str = "resnet") -> dict[str, float | None]:
    """Every task's headline number; None where the model has no text tower for retrieval.
    With ``a`` (the comparison's arguments) also the dense probe and the fine-tuning column."""
    obj = PIXELS if checkpoint == PIXELS else load_run(checkpoint, device)
    scores = score_tasks(obj, TASKS, evalsets)
    if a is not None and a.dense:
        from m3i.eval.segmentation import segmentation_score

        scores[DENSE[0]] = segmentation_score(obj, DENSE[1], split=a.split, device=device,
                                              limit=a.dense_limit)["metrics"]["mIoU"]
    if a is not None and a.finetune_steps:
        scores[FINETUNE[0]] = None if checkpoint == PIXELS else finetune_top1(checkpoint, a, backbone)
    if a is not None and a.detection:
        scores.update(detection_columns(obj, a, backbone))
    return scores


def detection_columns(model, a: argparse.Namespace, backbone: str) -> dict[str, float | None]:
    """The detection columns of one row (a loaded run, ``pixels`` or ``scratch``), same head and steps for all."""
    from m3i.eval.detection import detection_score

    kw = {"recipe": load_recipe("m3i", overrides=BACKBONES[backbone])} if model == SCRATCH else {}
    scores: dict[str, float | None] = {}
    for dataset in dict.fromkeys(d for d, _ in DETECTION.values()):
        r = detection_score(model, dataset, split=a.split, steps=a.detection_steps, limit=a.detection_limit,
                            device=a.device, **kw)["metrics"]
        for column, (d, metric) in DETECTION.items():
            for s in DETECTION_SETTINGS if d == dataset else ():
                m = r.get(s) or (r["frozen"] if model == PIXELS else None)
                scores[f"{column}_{s}"] = None if m is None else m[metric]
    return scores


def finetune_top1(checkpoint: Path | str, a: argparse.Namespace, backbone: str) -> float:
    """End-to-end fine-tuning top-1 at the comparison's fixed budget (the same for every row)."""
    from m3i.train.finetune import finetune

    ov = {"batch_size": a.finetune_batch, **({"test_limit": a.finetune_test} if a.finetune_test else {})}
    kw = {}
    if checkpoint == SCRATCH:  # the same backbone, from a random initialisation
        ov = [f"{k}={v}" for k, v in ov.items()] + BACKBONES[backbone]
        kw["recipe"] = "m3i"
    r = finetune(checkpoint, FINETUNE[1], steps=a.finetune_steps, overrides=ov, split=a.split, device=a.device,
                 progress=False, verbose=False, **kw)
    return r["metrics"]["top1"]


_EVALSETS: dict = {}


def run_one(recipe: str, seed: int, a: argparse.Namespace, tuned: dict, budget: dict) -> dict:
    """Train one recipe with one seed under its share of the budget and score it (in a worker
    process when --jobs > 1)."""
    if a.device == "cpu" and a.jobs > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // a.jobs))
    key = (a.limit, a.split)
    if key not in _EVALSETS:
        _EVALSETS[key] = load_evalsets(a.limit, a.split)
    steps = budget["steps"]
    ck, secs = train(recipe, Path(a.out) / "runs" / f"{recipe}-s{seed}", a.backbone, steps, a.batch, seed,
                     split=a.split, tuned=tuned, device=a.device, workers=a.workers, text_tower=a.text_tower)
    images = sum(steps) * a.batch
    return {"recipe": recipe, "seed": seed, "train_seconds": secs, "steps": sum(steps), "stage_steps": steps,
            "images": images, "flops": budget["flops"], "img_per_s": images / secs,
            "scores": score_all(ck, _EVALSETS[key], a.device or "cpu", a, a.backbone)}


# settings that change no score: a resumed comparison may differ in them
FREE = {"out", "resume", "recipes", "seeds", "first_seed", "jobs", "workers"}


def code_version() -> str | None:
    """The git tree of m3i's sources (``src/``): what the scores depend on, whatever else changed."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD:src"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def kept_runs(a: argparse.Namespace, path: Path, code: str | None) -> list[dict]:
    """``--resume``: the rows of an earlier ``results.json`` at ``path`` made with the same settings
    and the same sources, so only the missing (recipe, seed) pairs run; an error names what differs."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    mine, theirs = vars(a), old.get("config", {})
    differ = sorted(k for k in set(mine) | set(theirs) if k not in FREE and mine.get(k) != theirs.get(k))
    if differ:
        raise SystemExit(f"--resume: {path} was made with other settings ("
                         + ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in differ)
                         + "); use another --out or the same settings")
    if old.get("code") != code:
        raise SystemExit(f"--resume: {path} was made with other m3i sources (src tree {old.get('code')}, "
                         f"here {code}); its scores would not compare; use another --out")
    return old["runs"]


def run(a: argparse.Namespace) -> dict:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    code = code_version()
    kept = kept_runs(a, res_path, code) if a.resume else []
    tuned = json.loads(Path(a.tuned).read_text())["chosen"] if a.tuned else {}
    budget = plan(a, tuned)
    results = {"config": vars(a), "code": code, "tuned": tuned, "budget": budget, "runs": list(kept)}
    have = {(r["recipe"], r["seed"]) for r in kept}
    if kept:
        print(f"--resume: {len(kept)} rows kept from {res_path}: " + ", ".join(f"{r}-s{s}" for r, s in sorted(have)))
    print(f"budget {a.budget}: " + ", ".join(
        f"{r} {'+'.join(map(str, p['steps']))} steps" + (f" ({p['flops'] / 1e12:.1f} TFLOP)" if p["flops"] else "")
        for r, p in budget["recipes"].items()), flush=True)
    evalsets = load_evalsets(a.limit, a.split)
    if (PIXELS, 0) not in have:
        results["runs"].append({"recipe": PIXELS, "seed": 0, "train_seconds": 0.0, "images": 0, "img_per_s": None,
                                "scores": score_all(PIXELS, evalsets, a.device, a, a.backbone)})
    if a.finetune_steps:  # the fine-tuning baseline: no pre-training at all
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            if (SCRATCH, seed) in have:
                continue
            row = {k: None for k in (*TASKS, *((DENSE[0],) if a.dense else ()))}
            row[FINETUNE[0]] = finetune_top1(SCRATCH, a, a.backbone)
            if a.detection:
                row.update(detection_columns(SCRATCH, a, a.backbone))
            results["runs"].append({"recipe": SCRATCH, "seed": seed, "train_seconds": 0.0, "images": 0,
                                    "img_per_s": None, "scores": row})
    res_path.write_text(json.dumps(results, indent=2))
    jobs = [(r, s) for s in range(a.first_seed, a.first_seed + a.seeds) for r in a.recipes if (r, s) not in have]

    def done(row: dict) -> None:
        results["runs"].append(row)
        print(json.dumps({k: row[k] for k in ("recipe", "seed", "steps", "train_seconds", "scores")}), flush=True)
        res_path.write_text(json.dumps(results, indent=2))

    _EVALSETS[(a.limit, a.split)] = evalsets  # the in-process runs reuse them
    run_parallel(run_one, [(r, s, a, tuned, budget["recipes"][r]) for r, s in jobs], a.jobs, done)
    return results


def summarise(results: dict, out: Path) -> str:
    runs, recipes = results["runs"], list(dict.fromkeys(r["recipe"] for r in results["runs"]))
    tasks = list(dict.fromkeys(t for r in runs for t in r["scores"]))
    stats: dict[str, dict[str, tuple[float, float] | None]] = {}
    for rec in recipes:
        stats[rec] = {}
        for task in tasks:
            vals = [r["scores"][task] for r in runs if r["recipe"] == rec and r["scores"].get(task) is not None]
            stats[rec][task] = (float(np.mean(vals)), float(np.std(vals))) if vals else None
    ranks = mean_ranks({rec: {t: s[0] for t, s in stats[rec].items() if s} for rec in recipes})
    per_seed = seed_mean_ranks(runs, recipes)
    spread = {rec: float(np.std([r[rec] for r in per_seed])) for rec in recipes}
    cfg = results["config"]
    seeds = len({r["seed"] for r in runs if r["recipe"] not in (PIXELS, SCRATCH)}) or cfg["seeds"]  # merged: all
    where = f"{cfg.get('device') or 'cpu'}, split {cfg.get('split', 'test')}"
    budget = results.get("budget", {})
    per = (f"{budget['amount'] / 1e12:,.1f} TFLOP" if budget.get("kind") == "flops" else
           f"{budget['amount']:,.0f} {budget['kind']}" if budget else "")
    lines = [f"Backbone: {cfg['backbone']}; budget {per} per run (`--budget {cfg.get('budget')}`), batch "
             f"{cfg['batch']}; {seeds} seed(s); mean ± std over seeds; {where}.", "",
             *table_head(["recipe", *tasks, "mean rank", "± seeds", "TFLOP", "steps", "images", "train s", "img/s"])]
    for rec in recipes:
        cells = [f"{s[0] * 100:.1f} ± {s[1] * 100:.1f}" if s else "n/a" for s in stats[rec].values()]
        rs = [r for r in runs if r["recipe"] == rec]
        secs = np.mean([r["train_seconds"] for r in rs])
        ips = [r["img_per_s"] for r in rs if r.get("img_per_s")]
        flops = rs[0].get("flops")
        cost = (f"{flops / 1e12:,.1f} | {rs[0]['steps']:,} | {rs[0]['images']:,}" if flops else
                f"– | {rs[0].get('steps', 0):,} | {rs[0]['images']:,}" if ips else "– | – | –")
        lines.append(f"| {rec} | " + " | ".join(cells) + f" | {ranks[rec]:.2f} | {spread[rec]:.2f} | {cost} | "
                     + (f"{secs:.0f} | {np.mean(ips):.0f} |" if ips else "– | – |"))
    lines += ["", "Mean rank: the mean over the columns of a row's place among the rows that have the column "
              "(1 = best), from its mean over seeds; ± seeds: the spread (std) of the mean rank computed seed by "
              "seed (seed k of every row; a row with fewer seeds, e.g. pixels, its last)."]
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    plot(stats, f"{cfg['backbone']}, {per} per run", out)
    plot_ranks(ranks, per_seed, f"{cfg['backbone']}, {per} per run, {where}", out)
    return table


def mean_ranks(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each row's mean over the columns of its place among the rows that have the column (1 = best;
    pixels included); ``scores``: row -> column -> score. NaN for a row with no column."""
    places: dict[str, list[int]] = {rec: [] for rec in scores}
    for task in dict.fromkeys(t for row in scores.values() for t in row):
        have = sorted((rec for rec in scores if task in scores[rec]), key=lambda r: -scores[r][task])
        for i, rec in enumerate(have):
            places[rec].append(i + 1)
    return {rec: float(np.mean(p)) if p else float("nan") for rec, p in places.items()}


def seed_mean_ranks(runs: list[dict], recipes: list[str]) -> list[dict[str, float]]:
    """The mean ranks computed seed by seed: for seed k, every row's run of seed k (a row with fewer
    seeds, such as pixels, its last)."""
    seeds = sorted({r["seed"] for r in runs})
    out = []
    for k in seeds:
        scores = {}
        for rec in recipes:
            rs = sorted((r for r in runs if r["recipe"] == rec), key=lambda r: r["seed"])
            run = next((r for r in rs if r["seed"] == k), rs[-1])
            scores[rec] = {t: v for t, v in run["scores"].items() if v is not None}
        out.append(mean_ranks(scores))
    return out


def plot_ranks(ranks: dict[str, float], per_seed: list[dict[str, float]], what: str, out: Path) -> None:
    """OUT/mean_rank.png: every row's mean rank (lower is better), its seeds' ranks as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(ranks, key=lambda r: ranks[r])
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(order) + 1.2))
    colors = ["tab:red" if r.startswith("m3i") else "tab:gray" if r == "multistage" else
              "black" if r in (PIXELS, SCRATCH) else "tab:blue" for r in order]
    y = np.arange(len(order))
    ax.barh(y, [ranks[r] for r in order], color=colors, alpha=0.8)
    for i, rec in enumerate(order):
        ax.plot([s[rec] for s in per_seed], [i] * len(per_seed), "k.", ms=5)
    ax.set_yticks(y, order)
    ax.invert_yaxis()
    ax.set_xlabel("mean rank over the columns (1 = best); dots: each seed's")
    ax.set_title(f"Mean rank — {what}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "mean_rank.png", dpi=110)
    plt.close(fig)


def plot(stats: dict[str, dict[str, tuple[float, float] | None]], what: str, out: Path) -> None:
    """OUT/<task>.png: a bar per recipe (mean ± std over seeds), the baselines' levels dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = list(stats)
    for task in dict.fromkeys(t for rec in recipes for t in stats[rec]):
        have = [rec for rec in recipes if stats[rec][task]]
        if not have:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 3.2))
        means = [stats[r][task][0] * 100 for r in have]
        errs = [stats[r][task][1] * 100 for r in have]
        colors = ["tab:red" if r == "m3i" else "tab:gray" if r == "multistage" else
                  "black" if r in (PIXELS, SCRATCH) else "tab:blue" for r in have]
        ax.bar(have, means, yerr=errs, color=colors, capsize=3)
        for base in (PIXELS, SCRATCH):
            if base in have:
                ax.axhline(stats[base][task][0] * 100, color="black", lw=0.8, ls="--")
        ax.set_ylabel(f"{task} (%)")
        ax.set_title(f"{task} — {what}")
        lo = min(means) - max(errs + [0]) - 5
        ax.set_ylim(max(0, lo), min(100, max(means) + max(errs + [0]) + 3))
        fig.tight_layout()
        fig.savefig(out / f"{task.replace('@', '')}.png", dpi=110)
        plt.close(fig)


def merge(sources: list[str], out: Path) -> dict:
    """One table from several comparisons at the same budget: a later source's runs replace an earlier
    one's runs of the same recipe and seed (a re-run row beside rows kept from before, or a recipe's
    seeds run in separate processes with ``--first-seed``); each run keeps the source it came from,
    with that source's m3i sources and tuned overrides. The floor rows come from the first source."""
    merged: dict = {"merged_from": [], "runs": []}
    for src in sources:
        path = Path(src) / "results.json"
        if not path.is_file():
            raise SystemExit(f"--merge: {path} does not exist (expected a compare.py output folder)")
        res = json.loads(path.read_text())
        amount, first = res.get("budget", {}).get("amount"), merged.get("budget", {}).get("amount")
        if first and (not amount or abs(amount - first) > 0.01 * first):
            raise SystemExit(f"--merge: {path} has budget {amount!r}, not the {first!r} of {sources[0]}: "
                             "rows at other budgets do not compare")
        new = {(r["recipe"], r["seed"]) for r in res["runs"] if r["recipe"] not in (PIXELS, SCRATCH)}
        merged["runs"] = [r for r in merged["runs"] if (r["recipe"], r["seed"]) not in new] + [
            {**r, "source": src} for r in res["runs"] if (r["recipe"], r["seed"]) in new or not any(
                m["recipe"] == r["recipe"] for m in merged["runs"])]
        merged.setdefault("config", res["config"])
        merged.setdefault("budget", res.get("budget", {}))
        merged["merged_from"].append({"source": src, "code": res.get("code"), "tuned": res.get("tuned"),
                                      "recipes": sorted({rec for rec, _ in new})})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=2))
    return merged


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke form: few steps, one seed, small eval sets")
    p.add_argument("--backbone", choices=list(BACKBONES), default="resnet")
    p.add_argument("--recipes", nargs="+", default=RECIPES, choices=recipe_choices())
    p.add_argument("--budget", help="what every recipe gets the same of: flops=X|demo|demo*F, images=N or "
                                    "seconds=S (default flops=demo; on CUDA flops=demo*10; quick images=192)")
    p.add_argument("--batch", type=int, help="global batch (default 128; quick 32)")
    p.add_argument("--seeds", type=int, help="seeds per recipe (default 2; quick 1)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (to split seeds across processes)")
    p.add_argument("--limit", type=int, help="Fashion-MNIST train images for the probes (default all; quick 2000)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="val: pre-train on the fit parts and score val (for choices); test: the report")
    p.add_argument("--tuned", help="tune.py's JSON of chosen hyperparameters per recipe "
                                   "(default results/tune-<backbone>/chosen.json when present)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--workers", type=int, help="loader workers per run (data.num_workers)")
    p.add_argument("--text-tower", choices=["minilm", "scratch"],
                   help="text tower of the caption terms (default: the recipes'; scratch needs no weights)")
    p.add_argument("--no-dense", dest="dense", action="store_false", help="leave out the segmentation column")
    p.add_argument("--dense-limit", type=int, default=1000, help="scene canvases the dense probe fits on")
    p.add_argument("--finetune-steps", type=int, help="fine-tuning budget per row (default 60, with --quick 0; 0: no fine-tuning column)")
    p.add_argument("--finetune-batch", type=int, default=64)
    p.add_argument("--finetune-test", type=int, default=2000, help="test images scored after fine-tuning")
    p.add_argument("--detection", action="store_true",
                   help="add the detection columns (docs/detection.md): box AP frozen and fine-tuned, minutes per row")
    p.add_argument("--detection-steps", type=int, help="the detection head's steps (default: m3i eval's)")
    p.add_argument("--detection-limit", type=int, help="train canvases for detection (default all; LIMIT/4 scored)")
    p.add_argument("--out", help="output folder (default results/compare-<backbone>[-quick|-gpu])")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="no training: OUT's table from these comparisons' rows, a later one's recipes replacing "
                        "an earlier one's")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of OUT/results.json made with the same settings and sources; run the rest")
    return p


def settings(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with every default filled in (they depend on --quick and the device)."""
    a = parser().parse_args(argv)
    if a.finetune_steps is not None and a.finetune_steps < 0:
        parser().error(f"--finetune-steps: expected 0 (no fine-tuning column) or more steps, got {a.finetune_steps}")
    quick, gpu = a.quick, a.device.startswith("cuda")
    a.budget = a.budget or ("images=192" if quick else "flops=demo*10" if gpu else "flops=demo")
    try:
        parse_budget(a.budget)
    except ValueError as e:
        parser().error(str(e))
    a.batch = a.batch or (32 if quick else 512 if gpu else 128)
    a.seeds = a.seeds or (1 if quick else 2)
    a.limit = a.limit or (2000 if quick else None)
    if a.finetune_steps is None:  # 0 means no fine-tuning column
        a.finetune_steps = 0 if quick else 60
    if quick:
        a.dense = False
    a.out = a.out or f"results/compare-{a.backbone}{'-quick' if quick else '-gpu' if gpu else ''}"
    default_tuned = Path(f"results/tune-{a.backbone}/chosen.json")
    a.tuned = a.tuned or (str(default_tuned) if default_tuned.is_file() and not quick else None)
    return a


def main() -> None:
    a = settings()
    if a.merge:
        print(summarise(merge(a.merge, Path(a.out)), Path(a.out)))
        return
    t0 = time.perf_counter()
    results = run(a)
    print(summarise(results, Path(a.out)))
    print(f"total {time.perf_counter() - t0:.0f} s; results in {a.out}")


if __name__ == "__main__":
    main()
