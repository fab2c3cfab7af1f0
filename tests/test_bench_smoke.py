"""The comparison's --quick form runs end to end and writes well-formed results (not who wins)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG, needs_data

ROOT = Path(__file__).resolve().parents[1]


@needs_data
@pytest.mark.slow
def test_quick_comparison_completes_and_writes_results(tmp_path):
    out = tmp_path / "cmp"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    recipes = ["supervised", "clip", "simclr", "mae", "sim", "multistage", "m3i"]
    assert [r["recipe"] for r in res["runs"]] == ["pixels"] + recipes  # the raw-pixel floor comes first
    tasks = ["fmnist_linear", "fmnist_knn", "emoji_cat_linear", "emoji_sub_linear", "emoji_retrieval_R@1",
             "digits_linear"]
    for r in res["runs"]:
        assert list(r["scores"]) == tasks
        if r["recipe"] != "pixels":  # the quick budget: 192 images, 6 steps of 32 (multistage: 2 per stage)
            assert (r["images"], r["steps"]) == (192, 6) and res["config"]["budget"] == "images=192"
            assert r["flops"] == pytest.approx(sum(n * res["budget"]["flops_per_step"][st] for n, st in zip(
                r["stage_steps"], ["sim", "clip", "supervised"] if r["recipe"] == "multistage" else [r["recipe"]])))
        for task, v in r["scores"].items():
            if task.startswith("emoji_retrieval") and r["recipe"] not in ("clip", "m3i"):
                assert v is None  # no text target: n/a
            else:
                assert 0.0 <= v <= 1.0
    table = (out / "table.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in table) == 2 + len(recipes)
    for png in ["fmnist_linear", "fmnist_knn", "emoji_cat_linear", "emoji_sub_linear", "emoji_retrieval_R1",
                "digits_linear", "mean_rank"]:
        assert (out / f"{png}.png").stat().st_size > 1000
    # --resume keeps every row made with the same settings and sources and runs only what is missing
    before = {r["recipe"]: r for r in res["runs"]}
    res["runs"] = [r for r in res["runs"] if r["recipe"] != "supervised"]
    (out / "results.json").write_text(json.dumps(res))
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick", "--out", str(out),
                            "--resume", "--recipes", "supervised"], env=env, capture_output=True, text=True, timeout=HANG)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "7 rows kept" in again.stdout
    after = {r["recipe"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert after.keys() == before.keys()
    for name, row in after.items():
        if name == "supervised":  # run again: the same steps and the same scores
            assert row["steps"] == before[name]["steps"]
            def given(scores):
                return {k: v for k, v in scores.items() if v is not None}
            assert given(row["scores"]) == pytest.approx(given(before[name]["scores"]), abs=1e-6)
            assert row["scores"].keys() == before[name]["scores"].keys()
        else:
            assert row == before[name]
    # other settings: refused, naming the setting
    other = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick", "--out", str(out),
                            "--resume", "--batch", "16"], env=env, capture_output=True, text=True, timeout=HANG)
    assert other.returncode != 0 and "batch: 32 there, 16 here" in other.stderr
