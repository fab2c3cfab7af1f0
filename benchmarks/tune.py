"""The same hyperparameter search for every recipe of the comparison, on the validation split.

    pip install -e ".[bench]"      # Optuna
    python benchmarks/tune.py RECIPE [RECIPE ...] [--backbone resnet] [--trials 6] [--steps 120]

Each trial pre-trains RECIPE on the fit part of the built-in mix (``compare.py --split val``)
with a learning rate, a weight decay and the recipe's structural knob (``knobs.py``: a
temperature, a mask ratio, a term weight or the crop scale; ``--no-knob`` leaves it as shipped)
drawn by Optuna's TPE sampler (seeded, the same space for learning rate and weight decay and the
same number of trials for every recipe; the first trial is the recipe as shipped), then scores
the val part: the objective is the
mean of the val scores that every recipe has (Fashion-MNIST k-NN and linear, emoji category and
subcategory linear). Test splits are never read. Writes OUT/RECIPE.json (every trial) and
merges the best values into OUT/chosen.json, which ``compare.py`` reads
(default OUT: results/tune-<backbone>).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import optuna

from compare import BACKBONES, load_evalsets, recipe_choices, recipe_ref, score_all, train
from knobs import KNOBS, knob_default, knob_settings
from m3i.config import load_recipe

SPACE = {"train.lr": (1e-4, 1e-2), "train.weight_decay": (1e-3, 0.3)}  # log-uniform
OBJECTIVE = ["fmnist_knn", "fmnist_linear", "emoji_cat_linear", "emoji_sub_linear"]


def tune(recipe: str, a: argparse.Namespace, evalsets: dict) -> dict:
    out = Path(a.out)
    trials = []
    knob = KNOBS.get(recipe) if a.knob else None
    shipped = load_recipe(recipe_ref(recipe))
    if a.knob and knob is None:
        raise SystemExit(f"{recipe}: no structural knob in benchmarks/knobs.py (tune with --no-knob, or add one)")

    def settings(params: dict) -> dict:  # Optuna's parameters -> the recipe's settings
        values = {k: v for k, v in params.items() if k != "knob"}
        return {**values, **(knob_settings(shipped, knob, params["knob"]) if knob else {})}

    def objective(trial: optuna.Trial) -> float:
        params = {k: trial.suggest_float(k, lo, hi, log=True) for k, (lo, hi) in SPACE.items()}
        if knob:
            params["knob"] = trial.suggest_float("knob", knob.low, knob.high, log=knob.log)
        values = settings(params)
        extra = [f"{k}={v:.6g}" for k, v in values.items()]
        ck, secs = train(recipe, out / "runs" / f"{recipe}-t{trial.number}", a.backbone, a.steps, a.batch,
                         seed=0, extra=extra, split="val", device=a.device, text_tower=a.text_tower,
                         workers=a.workers)
        scores = score_all(ck, evalsets, a.device)
        value = sum(scores[k] for k in OBJECTIVE) / len(OBJECTIVE)
        trials.append({"trial": trial.number, "params": values, "val_scores": scores, "objective": value,
                       "train_seconds": secs})
        print(json.dumps({"recipe": recipe, **trials[-1]}), flush=True)
        return value

    def save(study: optuna.Study) -> dict:  # after every trial, so a cut-short search keeps what it found
        if not trials:
            return {}
        best = {k: float(f"{v:.4g}") for k, v in settings(study.best_params).items()}
        space = {**SPACE, **({"knob": {"name": knob.name, "settings": list(knob.paths), "range": [knob.low, knob.high],
                                        "log": knob.log}} if knob else {})}
        report = {"recipe": recipe, "backbone": a.backbone, "steps": a.steps, "batch": a.batch, "space": space,
                  "objective": OBJECTIVE, "trials_run": len(trials), "device": a.device, "text_tower": a.text_tower,
                  "best": best, "best_objective": study.best_value, "trials": trials}
        (out / f"{recipe}.json").write_text(json.dumps(report, indent=2))
        merge(out)
        return report

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=a.seed))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = {"train.lr": 1e-3, "train.weight_decay": 0.05}  # the recipes' defaults, first
    study.enqueue_trial({**first, **({"knob": knob_default(shipped, knob)} if knob else {})})
    study.optimize(objective, n_trials=a.trials, catch=(Exception,), callbacks=[lambda st, _: save(st)])
    return save(study)


def describe(space: dict) -> str:
    """A report's search space in words: each setting's range, log or linear."""
    parts = [f"{k} [{lo:g}, {hi:g}] (log)" for k, v in space.items() if k != "knob" for lo, hi in [v]]
    if "knob" in space:
        k = space["knob"]
        parts.append(f"{k['name']} ({', '.join(k['settings'])}) [{k['range'][0]:g}, {k['range'][1]:g}]"
                     f"{' (log)' if k['log'] else ''}")
    return ", ".join(parts)


def merge(out: Path) -> dict:
    """OUT/chosen.json from every OUT/RECIPE.json (recipes may be tuned in separate processes)."""
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "chosen.json"]
    chosen = {"chosen": {r["recipe"]: r["best"] for r in reports},
              "protocol": {r["recipe"]: f"{r['trials_run']} TPE trials over {describe(r['space'])}, {r['steps']} steps x "
                                        f"{r['batch']} on the fit split ({r['device']}), objective = mean val "
                                        f"{r['objective']}" for r in reports}}
    (out / "chosen.json").write_text(json.dumps(chosen, indent=2))
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*", metavar="RECIPE",  # checked below: argparse refuses an empty list of choices
                   help="the multi-stage pipeline uses the values chosen for its stages")
    p.add_argument("--backbone", choices=list(BACKBONES), default="resnet")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--limit", type=int, default=10000, help="Fashion-MNIST fit images for the probes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--text-tower", choices=["minilm", "scratch"], help="text tower of the caption terms")
    p.add_argument("--workers", type=int, help="loader workers per run (data.num_workers)")
    p.add_argument("--knob", action=argparse.BooleanOptionalAction, default=True,
                   help="search each recipe's structural knob too (benchmarks/knobs.py)")
    p.add_argument("--merge", action="store_true", help="only rebuild OUT/chosen.json from OUT/*.json")
    p.add_argument("--out")
    a = p.parse_args()
    known = [r for r in recipe_choices() if r != "multistage"]
    for r in a.recipes:
        if r not in known:
            p.error(f"unknown recipe {r!r}; expected one of {', '.join(known)}")
    a.out = a.out or f"results/tune-{a.backbone}"
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.merge:
        print(json.dumps(merge(Path(a.out)), indent=2))
        return
    evalsets = load_evalsets(a.limit, "val")
    t0 = time.perf_counter()
    for recipe in a.recipes:
        r = tune(recipe, a, evalsets)
        print(f"{recipe}: best {r['best']} (val objective {r['best_objective']:.4f})" if r else
              f"{recipe}: every trial failed")
    print(f"total {time.perf_counter() - t0:.0f} s; chosen values in {a.out}/chosen.json")


if __name__ == "__main__":
    main()
