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
    assert list(vit["rows"]) == ["16", "32"]
    for row in vit["rows"].values():
        # model FLOPs of a step: the masked online pass (B/2 images' worth of N tokens) forward and
        # backward is ≥ 3·2·P·(B/2)·N, the teacher's pass on the other view ≥ 2·P·B·N
        p, b, n = vit["backbone_params"], row["batch"], (vit["img_size"] // 4) ** 2
        assert 5 * p * b * n <= row["flops_per_step"] <= 40 * p * b * n
        assert row["img_per_s"] > 0 and row["loss_finite"]
        assert row["host_syncs_per_step"] == 0, row["host_sync_sites"]  # the dispatcher's count on the CPU
        assert row["mfu"] == row["flops_per_step"] / row["step_s"] / (s["peak"]["bf16_matmul_tflops"] * 1e12)
    ddp = s["ddp"]  # torchrun with one process: a process group, and the trainer wraps in DDP
    assert ddp["backend"] == "gloo" and ddp["world"] == 1 and ddp["wrap"] == "DistributedDataParallel"
    assert ddp["steps"] == 10 and ddp["loss_finite"]
    assert ddp["fsdp_steps"] == 10 and ddp["fsdp_loss_finite"] and ddp["fsdp_sharded_optimizer"]
    assert "bf16 matmul" in stdout and "MFU" in stdout


@needs_data
@pytest.mark.slow
def test_gpu_check_smoke_sets_m3i_beside_timm_and_open_clip(tmp_path):
    pytest.importorskip("timm")  # with torchvision: not in the CPU-only environment
    pytest.importorskip("open_clip")
    res, stdout = run_check(tmp_path, "--sections", "peak", "timm", "open_clip")
    s = res["sections"]
    assert all(sec["ok"] for sec in s.values()), {k: v.get("error") for k, v in s.items()}
    for name, ours, peer in (("timm", "m3i supervised", "timm"), ("open_clip", "m3i clip", "open_clip")):
        rows = s[name]["rows"]
        assert s[name]["ratio"] == rows[ours]["img_per_s"] / rows[peer]["img_per_s"]
        assert rows[ours]["host_syncs_per_step"] == 0 and rows[ours]["loss_finite"] and rows[peer]["loss_finite"]
        assert rows[ours]["mfu"] > 0 and rows[peer]["mfu"] > 0
    assert s["timm"]["rows"]["timm"]["ratio_to_timm"] == 1.0


@needs_data
@pytest.mark.slow
def test_gpu_check_records_a_failing_section_and_goes_on(tmp_path):
    res, _ = run_check(tmp_path, "--sections", "recipes", "peak", "--recipes", "m3i", "nosuchrecipe",
                       "--recipe-steps", "2")
    runs = res["sections"]["recipes"]["runs"]
    assert runs["m3i"]["ok"] and not runs["nosuchrecipe"]["ok"]
    assert "nosuchrecipe" in runs["nosuchrecipe"]["error"]
    assert res["sections"]["peak"]["ok"]
