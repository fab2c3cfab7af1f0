"""`train.precision auto`: bf16 only where the device has bfloat16 kernels, fp16 on a GPU without
them, fp32 on other CPUs; a run records the format it trained in; bf16 asked for where it is
emulated, and fp16 on a CPU, train as asked, with a warning; the fp16 gradient scaler's own skips
are told as what they are and fail no run."""
from __future__ import annotations

import pytest
import torch
import yaml

from faultkit import error_lines, finished_run, image_folder, metrics, pretrain_args, run_m3i
from m3i import device
from m3i.runs import checkpoint as ckpt
from m3i.device import resolve_precision


@pytest.mark.parametrize("native, kind, want", [(True, "cpu", "bf16"), (False, "cpu", "fp32"),
                                                (True, "cuda", "bf16"), (False, "cuda", "fp16")])
def test_auto_takes_bf16_only_where_the_device_has_it(monkeypatch, native, kind, want):
    monkeypatch.setattr(device, "native_bf16", lambda dev: native)
    assert resolve_precision("auto", kind) == want


def test_an_explicit_precision_is_kept_and_emulated_bf16_is_warned_about(monkeypatch):
    monkeypatch.setattr(device, "native_bf16", lambda dev: False)
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.warns(UserWarning, match="emulated.*fp32"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    for native, emulated in ((False, 1), (True, 0)):
        monkeypatch.setattr(device, "native_fp16", lambda dev, native=native: native)
        with pytest.warns(UserWarning, match="fp16 on a cpu.*scaler skips the first steps.*picks fp32 here") as said:
            assert resolve_precision("fp16", "cpu") == "fp16"
        assert str(said[0].message).count("emulated") == emulated
    with pytest.raises(ValueError, match="'fp8'.*auto, bf16, fp16, fp32"):
        resolve_precision("fp8", "cpu")


def test_the_cpus_native_bf16_is_onednns_own_answer():
    # the CPU answer is oneDNN's (AVX512-BF16 / AMX), never assumed from the device type
    assert device.native_bf16("cpu") is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert device.native_bf16("mps") is False


def test_a_run_records_the_format_auto_chose(tmp_path):
    run = finished_run(tmp_path / "run", image_folder(tmp_path / "images"), "train.steps=2", "train.precision=auto")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["precision"] == resolve_precision("auto", "cpu") != "auto"


@pytest.mark.slow
def test_fp16_on_a_cpu_warns_and_its_scaler_skips_fail_no_run(tmp_path):
    """fp16 on a CPU: one warning line; the first steps' scaled gradients overflow float16 and the
    scaler skips them, halving its loss scale each time; said as that, counted apart, and the run
    ends with its checkpoint (no "lower train.lr" advice for what is no fault)."""
    run = tmp_path / "run"
    done = run_m3i(*pretrain_args(run, image_folder(tmp_path / "images"), "train.steps=2",
                                  "train.precision=fp16"))
    assert done.returncode == 0, done.stderr
    [warning] = [ln for ln in done.stderr.splitlines() if "warning" in ln]
    assert warning.startswith("m3i: warning: precision fp16 on a cpu: float16 with a gradient scaler is meant for GPUs")
    assert not error_lines(done.stderr.replace(warning, "")) and "lower train.lr" not in done.stdout + done.stderr
    rows = metrics(run)
    assert [r["scaler_skips"] for r in rows] == [r["bad_steps"] for r in rows] == [1, 2]  # both steps overflowed
    for r in rows:
        assert f"step {r['step']}: 1 step(s) skipped by the fp16 gradient scaler since step {r['step'] - 1}" in done.stdout
    assert f"(now {2.0 ** (16 - 2):g})" in done.stdout
    _, state = ckpt.load(run)
    # the scale began at 2^16 and halved once a skipped step; the counts go on with a resumed run
    assert state["scaler"]["scale"] == 2.0 ** (16 - 2) and state["scaler_skips"] == state["bad_steps"] == 2
