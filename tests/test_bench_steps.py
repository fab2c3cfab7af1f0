"""The benchmarks that time a training step (accumulation.py, precision.py, peers.py) run at a tiny
size, their step the trainer's own (benchmarks/common.py builds it through m3i.train.setup), and
the shared helpers they read figures with."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HANG, needs_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402

from m3i.config import load_recipe  # noqa: E402


def bench(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, args)], env=common.child_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_accumulation_benchmark_sets_each_k_beside_one_pass():
    proc = bench(ROOT / "benchmarks" / "accumulation.py", "--batch", "8", "--ks", "1", "2", "--rounds", "1",
                 "--device", "cpu", "backbone.depth=1")
    rows = [line for line in proc.stdout.splitlines() if line.strip().startswith("K=")]
    assert [r.split(":")[0].strip() for r in rows] == ["K=1", "K=2"]
    assert "(1.00x K=1), peak" in rows[0] and rows[0].endswith("(1.00x K=1)")


@needs_data
@pytest.mark.slow
def test_precision_benchmark_times_each_format(tmp_path):
    out = tmp_path / "precision.json"
    proc = bench(ROOT / "benchmarks" / "precision.py", "--recipe", "sim", "--batch", "4", "--out", out)
    res = json.loads(out.read_text())
    assert list(res["formats"]) == ["fp32", "bf16"] and res["formats"]["fp32"]["vs_fp32"] == 1.0
    for f, row in res["formats"].items():
        assert row["s_per_step"] > 0 and row["img_per_s"] == pytest.approx(4 / row["s_per_step"])
        assert f"\n{f} " in proc.stdout


@pytest.mark.slow
def test_peers_benchmark_sets_m3i_beside_its_peer():
    for package in ("timm", "lightly", "open_clip"):  # with torchvision: not in the CPU-only environment
        pytest.importorskip(package)
    proc = bench(ROOT / "benchmarks" / "peers.py", "--recipes", "supervised", "--pairs", "2")
    assert "supervised  m3i" in proc.stdout and "m3i/peer median" in proc.stdout


def test_the_benchmark_step_is_the_trainers_staged_as_the_loop_stages_it(one_thread):
    recipe = load_recipe("sim", overrides=["backbone.name=vit_micro", "backbone.depth=1", "train.precision=fp32",
                                           "train.warmup_steps=0", "data.batch_size=4"])
    batch = common.random_batch(4, recipe.data.image_size, 10)
    run = common.trainer_step(recipe, torch.device("cpu"), 0)
    step = common.m3i_step(run, batch)
    staged = step.staged()  # the host's share done once: the same views every call
    first = staged()
    assert torch.isfinite(first) and int(run.step.bad.total) == 0
    assert run.sched.last_epoch == 1  # the trainer's schedule moved on with its step
    step()  # views drawn again: a step of its own
    assert run.sched.last_epoch == 2 and run.opt.state  # fused AdamW's moments, as in a run


def test_the_steady_rate_leaves_out_the_steps_before_the_meter_settled():
    # 5 steps of start-up in 10 s, then 20 steps of 8 images in 20 s: 8 images/s
    times = {step: (10.0 if step <= 5 else 10.0 + (step - 5)) for step in range(1, 26)}
    rows = [{"step": s, "img_per_s": s * 8 / t} for s, t in times.items()]
    assert common.steady_img_per_s(rows, 8) == pytest.approx(8.0)
    assert common.steady_img_per_s(rows[:1], 8) == rows[0]["img_per_s"]  # one row: the meter's own figure


def test_a_table_head_has_one_rule_cell_per_column():
    assert common.table_head(["recipe", "a", "b"]) == ["| recipe | a | b |", "|---|---|---|"]
