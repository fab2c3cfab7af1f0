"""benchmarks/demo_step.py --smoke: every precision × lever runs the demo's step in one process, and
every figure is consistent with the steps it times (not which variant is faster)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_demo_step_benchmark_times_each_precision_and_lever_side_by_side(tmp_path):
    out = tmp_path / "demo-step.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_step.py"), "--smoke", "--levers",
                           "channels_last", "--out", str(out)],  # compile: minutes of compiling on a CPU
                          env=env, capture_output=True, text=True, timeout=HANG, cwd=ROOT / "benchmarks")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [(r["precision"], r["lever"]) for r in rows] == [("fp32", "as shipped"), ("bf16", "as shipped"),
                                                            ("fp32", "channels_last"), ("bf16", "channels_last")]
    base = rows[0]["s_per_step"]
    for r in rows:
        assert r["steps_timed"] == 1 and r["s_per_step"] > 0
        assert r["img_per_s"] == pytest.approx(res["batch"] / r["s_per_step"])
        assert r["vs_fp32_shipped"] == pytest.approx(base / r["s_per_step"])
    assert proc.stdout.count("| fp32 |") == 2 and proc.stdout.count("| bf16 |") == 2
