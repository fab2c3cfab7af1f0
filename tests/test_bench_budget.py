"""benchmarks/compare.py's budgets: every recipe gets the same training FLOPs (or images), the
multi-stage pipeline split over its stages, and a clear error for a budget it cannot read."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import needs_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402

from m3i.config import load_recipe  # noqa: E402
from m3i.train.dryrun import step_flops  # noqa: E402
from m3i.train.loop import build_mixture  # noqa: E402


@pytest.mark.parametrize("text,want", [("flops=2.5e15", ("flops", 2.5e15)), ("images=230400", ("images", 230400.0)),
                                       ("seconds=600", ("seconds", 600.0)), ("flops=demo", ("flops", -1.0)),
                                       ("flops=demo*10", ("flops", -10.0))])
def test_a_budget_reads_as_its_kind_and_amount(text, want):
    assert compare.parse_budget(text) == want


@pytest.mark.parametrize("text", ["flops", "flops=", "steps=10", "images=-3", "flops=demo*0", "flops=demox2",
                                  "seconds=ten"])
def test_a_budget_it_cannot_read_is_refused_naming_what_it_expects(text, capsys):
    with pytest.raises(ValueError, match="--budget"):
        compare.parse_budget(text)
    with pytest.raises(SystemExit):
        compare.settings(["--budget", text])
    assert "--budget" in capsys.readouterr().err


@needs_data
def test_a_flop_budget_gives_every_recipe_the_same_flops_and_splits_the_pipeline_over_its_stages():
    a = compare.settings(["--budget", "flops=demo", "--batch", "16", "--recipes", "supervised", "sim",
                          "multistage", "m3i"])
    p = compare.plan(a)
    cost = p["flops_per_step"]
    # the amount: the m3i demo run's images at m3i's FLOPs per image
    demo = load_recipe("m3i")
    assert p["amount"] == pytest.approx(demo.train.steps * demo.data.batch_size * cost["m3i"] / 16)
    # each step counted independently by the dry run's counter on the comparison's recipe
    r = load_recipe("sim", overrides=compare.overrides_for("sim", "resnet", 1, 16, 0))
    assert cost["sim"] == step_flops(r, 0, 16)
    for each in p["recipes"].values():
        per_stage = p["amount"] / len(each["stages"])
        for stage, n in zip(each["stages"], each["steps"]):
            assert abs(n * cost[stage] - per_stage) <= cost[stage] / 2  # the nearest whole step
        assert each["flops"] == pytest.approx(p["amount"], rel=0.01)
    assert p["recipes"]["multistage"]["stages"] == ["sim", "clip", "supervised"]
    # m3i sees the demo's images: at a batch of 16, 8 × its steps
    assert p["recipes"]["m3i"]["steps"] == [demo.train.steps * demo.data.batch_size // 16]
    # an images budget: the same steps for all, the pipeline's split evenly
    p = compare.plan(compare.settings(["--budget", "images=1600", "--batch", "16", "--recipes", "sim", "multistage"]))
    assert p["recipes"]["sim"]["steps"] == [100] and p["recipes"]["multistage"]["steps"] == [33, 33, 34]


@needs_data
def test_a_tuned_row_is_costed_as_it_trains_while_the_demo_budget_stays_the_shipped_recipes():
    a = compare.settings(["--budget", "flops=demo", "--batch", "16", "--recipes", "m3i"])
    plain = compare.plan(a)
    clean = {"m3i": {"views.input_mode": "fill"}}  # the masked view drawn whole: more work per step
    p = compare.plan(a, clean)
    assert p["amount"] == pytest.approx(plain["amount"])  # the demo as shipped sets the budget
    r = load_recipe("m3i", overrides=compare.overrides_for("m3i", "resnet", 1, 16, 0, tuned=clean))
    classes = build_mixture(r).num_classes
    assert p["flops_per_step"]["m3i"] == step_flops(r, classes, 16) > plain["flops_per_step"]["m3i"]
    n = p["recipes"]["m3i"]["steps"][0]
    assert abs(n * p["flops_per_step"]["m3i"] - p["amount"]) <= p["flops_per_step"]["m3i"] / 2
    assert n < plain["recipes"]["m3i"]["steps"][0]


def _comparison(folder: Path, amount: float, rows: dict[str, float], seed: int = 0) -> str:
    runs = [{"recipe": rec, "seed": seed, "steps": 10, "flops": amount, "images": 160, "train_seconds": 1.0,
             "img_per_s": 160.0, "scores": {"fmnist_knn": v}} for rec, v in rows.items()]
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({
        "config": {"backbone": "resnet", "budget": "flops=demo", "batch": 16, "seeds": 1}, "code": folder.name,
        "tuned": {}, "budget": {"kind": "flops", "amount": amount}, "runs": runs}))
    return str(folder)


def test_a_merged_table_takes_a_later_comparisons_rows_in_place_of_the_same_recipes(tmp_path, capsys):
    old = _comparison(tmp_path / "old", 1e12, {"pixels": 0.80, "supervised": 0.90, "m3i": 0.70})
    new = _comparison(tmp_path / "new", 1.001e12, {"pixels": 0.10, "m3i": 0.95})
    res = compare.merge([old, new], tmp_path / "out")
    got = {r["recipe"]: (r["scores"]["fmnist_knn"], r["source"]) for r in res["runs"]}
    # pixels and supervised from the first, m3i replaced by the later run
    assert got == {"pixels": (0.80, old), "supervised": (0.90, old), "m3i": (0.95, new)}
    assert [m["code"] for m in res["merged_from"]] == ["old", "new"]
    table = compare.summarise(res, tmp_path / "out")
    assert "| m3i | 95.0 ± 0.0 | 1.00 |" in table  # first of three on the one column
    far = _comparison(tmp_path / "far", 2e12, {"m3i": 0.99})
    with pytest.raises(SystemExit, match="far.*budget"):
        compare.merge([old, far], tmp_path / "out2")


def test_a_merged_table_joins_a_recipes_seeds_run_in_separate_comparisons(tmp_path):
    first = _comparison(tmp_path / "s0", 1e12, {"pixels": 0.80, "m3i": 0.70, "dino": 0.60})
    second = _comparison(tmp_path / "s1", 1e12, {"pixels": 0.10, "m3i": 0.74}, seed=1)
    res = compare.merge([first, second], tmp_path / "out")
    got = sorted((r["recipe"], r["seed"], r["scores"]["fmnist_knn"]) for r in res["runs"])
    assert got == [("dino", 0, 0.60), ("m3i", 0, 0.70), ("m3i", 1, 0.74), ("pixels", 0, 0.80)]
    table = compare.summarise(res, tmp_path / "out")
    assert "| m3i | 72.0 ± 2.0 |" in table and "; 2 seed(s);" in table  # mean ± std (population) of both


def test_the_mean_rank_and_its_spread_over_seeds_follow_each_seeds_places(tmp_path):
    runs = [{"recipe": rec, "seed": seed, "steps": 1, "flops": 1e12, "images": 16, "train_seconds": 1.0,
             "img_per_s": 16.0, "scores": {"a": a, "b": b}}
            for rec, seed, a, b in [("pixels", 0, 0.50, 0.50), ("x", 0, 0.90, 0.40), ("x", 1, 0.80, 0.60),
                                    ("y", 0, 0.70, 0.45), ("y", 1, 0.85, 0.70)]]
    # seed 0: a: x 1, y 2, pixels 3; b: pixels 1, y 2, x 3 -> x 2.0, y 2.0, pixels 2.0
    # seed 1 (pixels' only run): a: y 1, x 2, pixels 3; b: y 1, x 2, pixels 3 -> x 2.0, y 1.0, pixels 3.0
    per_seed = compare.seed_mean_ranks(runs, ["pixels", "x", "y"])
    assert per_seed == [{"pixels": 2.0, "x": 2.0, "y": 2.0}, {"pixels": 3.0, "x": 2.0, "y": 1.0}]
    res = {"config": {"backbone": "resnet", "budget": "flops=demo", "batch": 16, "seeds": 2},
           "budget": {"kind": "flops", "amount": 1e12}, "runs": runs}
    table = compare.summarise(res, tmp_path)
    # from the means over seeds: a: x .85, y .775, pixels .5; b: y .575, pixels .5, x .5 (tie kept in row order)
    assert "| y | 77.5 ± 7.5 | 57.5 ± 12.5 | 1.50 | 0.50 |" in table
    assert "| pixels | 50.0 ± 0.0 | 50.0 ± 0.0 | 2.50 | 0.50 |" in table
    assert (tmp_path / "mean_rank.png").stat().st_size > 0
