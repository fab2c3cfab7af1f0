"""benchmarks/gpu_check.py in its --smoke form (tiny, on the CPU): every section runs in its own
process, records its figures in one JSON, and an error in one section is recorded, not fatal."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG, needs_data

ROOT = Path(__file__).resolve().parents[1]


def run_check(tmp_path, *args):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out),
                           *args], env=env, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@needs_data
@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section_and_records_figures(tmp_path):
    res, stdout = run_check(tmp_path, "--sections", "peak", "recipes", "vit", "ddp", "--recipes", "clip", "m3i")
    s = res["sections"]
    assert set(s) == {"peak", "recipes", "vit", "ddp"}
    assert all(sec["ok"] for sec in s.values()), {k: v.get("error") for k, v in s.items()}
    assert s["peak"]["bf16_matmul_tflops"] > 0
    runs = s["recipes"]["runs"]
    assert list(runs) == ["clip", "m3i"]  # both carry a caption term: the scratch tower stood in for MiniLM
    for row in runs.values():
        assert row["ok"] and row["img_per_s"] > 0 and row["loss_finite"]
    vit = s["vit"]
    # model FLOPs of a step: the masked online pass (two images per canvas of N tokens) forward and
    # backward is ≥ 3·2·P·(B/2)·N, the teacher's pass on the other view ≥ 2·P·B·N
    p, b, n = vit["backbone_params"], vit["batch"], (vit["img_size"] // 4) ** 2
    assert 5 * p * b * n <= vit["flops_per_step"] <= 40 * p * b * n
    assert vit["img_per_s"] > 0 and vit["loss_finite"]
    assert vit["mfu"] == vit["flops_per_step"] / vit["step_s"] / (s["peak"]["bf16_matmul_tflops"] * 1e12)
    ddp = s["ddp"]  # torchrun with one process: a process group, and the trainer wraps in DDP
    assert ddp["backend"] == "gloo" and ddp["world"] == 1 and ddp["wrap"] == "DistributedDataParallel"
    assert ddp["steps"] == 10 and ddp["loss_finite"]
    assert ddp["fsdp_steps"] == 10 and ddp["fsdp_loss_finite"] and ddp["fsdp_sharded_optimizer"]
    assert "bf16 matmul" in stdout and "MFU" in stdout


@needs_data
@pytest.mark.slow
def test_gpu_check_records_a_failing_section_and_goes_on(tmp_path):
    res, _ = run_check(tmp_path, "--sections", "recipes", "peak", "--recipes", "m3i", "nosuchrecipe",
                       "--recipe-steps", "2")
    runs = res["sections"]["recipes"]["runs"]
    assert runs["m3i"]["ok"] and not runs["nosuchrecipe"]["ok"]
    assert "nosuchrecipe" in runs["nosuchrecipe"]["error"]
    assert res["sections"]["peak"]["ok"]
