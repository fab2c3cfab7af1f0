"""`train.precision auto`: bf16 only where the device has bfloat16 kernels, fp16 on a GPU without
them, fp32 on other CPUs; a run records the format it trained in; bf16 asked for where it is
emulated trains as asked, with a warning."""
from __future__ import annotations

import pytest
import torch
import yaml

from faultkit import finished_run, image_folder
from m3i import device
from m3i.device import resolve_precision


@pytest.mark.parametrize("native, kind, want", [(True, "cpu", "bf16"), (False, "cpu", "fp32"),
                                                (True, "cuda", "bf16"), (False, "cuda", "fp16")])
def test_auto_takes_bf16_only_where_the_device_has_it(monkeypatch, native, kind, want):
    monkeypatch.setattr(device, "native_bf16", lambda dev: native)
    assert resolve_precision("auto", kind) == want


def test_an_explicit_precision_is_kept_and_emulated_bf16_is_warned_about(monkeypatch):
    monkeypatch.setattr(device, "native_bf16", lambda dev: False)
    for p in ("fp32", "fp16"):
        assert resolve_precision(p, "cpu") == p
    with pytest.warns(UserWarning, match="emulated.*fp32"):
        assert resolve_precision("bf16", "cpu") == "bf16"
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
