"""benchmarks/loader.py at a tiny size: it writes its shards and folder, times every combination
and prints the cores-per-GPU table from a given step rate."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_loader_benchmark_prints_its_table(tmp_path):
    out = tmp_path / "loader.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader.py"), "--size", "32", "--batch", "8",
                           "--batches", "2", "--images", "24", "--workers", "0", "--photo", "96x64",
                           "--step-img-per-s", "1000", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {(r["source"], r["draft"]) for r in res["runs"]} == {("folder", True), ("folder", False),
                                                                 ("shards", True), ("shards", False)}
    for r in res["summary"]:
        assert r["img_per_s"] > 0 and r["cores_per_gpu"] == 1000 / r["img_per_s"]
    assert proc.stdout.count("| 96x64 |") == 4


@pytest.mark.slow
def test_loader_scale_benchmark_prints_its_comparison(tmp_path):
    out = tmp_path / "scale.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader.py"), "--samples", "300", "--shards", "3",
                           "--data", str(tmp_path / "set"), "--photo", "32x24", "--size", "16", "--batch", "16",
                           "--batches", "2", "--repeats", "1", "--workers", "1", "--ranks", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["index"]["samples"] == 300 and res["index"]["bytes_per_sample"] < 64 * 4  # the shard table: 3 shards
    assert sorted((tmp_path / "set").glob("*.tar")) and list((tmp_path / "set").glob(".m3i-index-*.bin"))
    for kind in ("m3i", "wds"):
        assert res[kind]["img_per_cpu_s"][0] > 0 and len(res[kind]["memory"]) == 1
        assert [m["role"] for m in res[kind]["memory"][0]] == ["rank", "worker"]
    assert "| img per loader CPU-second, side by side |" in proc.stdout and "against webdataset" in proc.stdout
