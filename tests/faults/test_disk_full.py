"""A full disk while a checkpoint is written: the previous checkpoint stays whole and `latest`,
the error is one clear line, and the run resumes from it to the same weights."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from faultkit import error_lines, final_weights, image_folder, pretrain_args
from m3i.cli import main
from m3i.runs import checkpoint as ckpt


@pytest.mark.slow
def test_enospc_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    data = image_folder(tmp_path / "images")
    assert main(pretrain_args(tmp_path / "clean", data, "train.steps=5")) == 0

    real = ckpt.save_file

    def disk_full_at_step_3(tensors, filename, metadata=None):
        if "step_000003" in filename and filename.endswith(ckpt.OPTIMIZER_FILE):
            real(tensors, filename + ".whole", metadata=metadata)  # the device fills up half-way
            with open(filename + ".whole", "rb") as src, open(filename, "wb") as dst:
                dst.write(src.read()[: os.path.getsize(filename + ".whole") // 2])
            os.unlink(filename + ".whole")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real(tensors, filename, metadata=metadata)

    run = tmp_path / "run"
    monkeypatch.setattr(ckpt, "save_file", disk_full_at_step_3)
    capsys.readouterr()
    assert main(pretrain_args(run, data, "train.steps=5")) == 1
    (line,) = error_lines(capsys.readouterr().err)
    root = run / "checkpoints"
    assert line == (f"m3i pretrain: error: {root / 'step_000003'}: the checkpoint could not be written (No space "
                    f"left on device); the previous checkpoint {root / 'step_000002'} is whole. Free some space (or "
                    f"fix the folder's permissions), then continue with `m3i pretrain --resume {run}`")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001", "step_000002"]  # no partial folder
    weights, state = ckpt.load(run)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())

    monkeypatch.setattr(ckpt, "save_file", real)  # space freed
    assert main(["pretrain", "--resume", str(run), "--no-progress"]) == 0
    clean, resumed = final_weights(tmp_path / "clean"), final_weights(run)
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)
