"""benchmarks/multicrop.py --smoke: both settings run, each with today's two views and with local
crops, and every figure is consistent with the crops it counts (not which variant is faster)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_multicrop_benchmark_prints_both_settings_side_by_side(tmp_path):
    out = tmp_path / "multicrop.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multicrop.py"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=HANG, cwd=ROOT / "benchmarks")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["views"], r["crops"]) for r in rows] == [("two views", 2), ("two views + 8 local", 10)] * 2
    # crop pixels per image: 2 × 224² (+ 8 × 96²), 2 × 32² (+ 8 × 16²)
    assert [r["crop_px_per_image"] for r in rows] == [2 * 224 ** 2, 2 * 224 ** 2 + 8 * 96 ** 2,
                                                      2 * 32 ** 2, 2 * 32 ** 2 + 8 * 16 ** 2]
    for r in rows:
        assert r["img_per_cpu_s"] > 0 and r["crop_px_per_cpu_s"] == pytest.approx(r["img_per_cpu_s"] * r["crop_px_per_image"])
    assert proc.stdout.count("| two views |") == 2 and proc.stdout.count("| two views + 8 local |") == 2
