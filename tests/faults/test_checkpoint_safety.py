"""Untrusted checkpoints: nothing in a checkpoint is ever unpickled, and a folder that carries
anything but the three files m3i writes is refused, naming the file, by every command."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from faultkit import error_lines, image_folder, pretrain_args
from m3i.cli import main
from m3i.runs import checkpoint as ckpt


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    data = image_folder(root / "images")
    assert main(pretrain_args(root / "run", data, "train.steps=2")) == 0
    return root / "run", data


def commands(run, data, out):
    return {
        "export": ["export", "--checkpoint", str(run), "--out", str(out / "vit.safetensors")],
        "eval": ["eval", "--checkpoint", str(run), "--task", "knn", "--dataset", f"folder:{data}", "--no-progress"],
        "resume": ["pretrain", "--resume", str(run), "--no-progress", "--steps", "3"],
        "init-from": pretrain_args(out / "next", data, "train.steps=1", "train.warmup_steps=0", options=("--init-from", str(run))),
    }


@pytest.mark.parametrize("layout", ["beside", "legacy", "as-model"])
@pytest.mark.slow
def test_a_payload_checkpoint_is_refused_by_every_command_and_never_runs(trained, tmp_path, capsys, layout):
    run, data = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    step = ckpt.find(copy)
    marker = tmp_path / "payload-ran"
    carrier = step / ("model.safetensors" if layout == "as-model" else "state.pt")
    if layout == "legacy":  # the layout older checkpoints had: weights + a pickled state.pt
        (step / ckpt.OPTIMIZER_FILE).unlink()
        (step / ckpt.STATE_FILE).unlink()
    torch.save({"step": 1, "optimizer": Payload(marker)}, carrier)

    # the payload is live: unpickling it (as m3i once did) runs it
    live = tmp_path / "payload.pt"
    live.write_bytes(carrier.read_bytes())
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(live)!r}, weights_only=False)"],
                   check=True)
    assert marker.exists()
    marker.unlink()

    for name, argv in commands(copy, data, tmp_path).items():
        capsys.readouterr()
        assert main(argv) == 2, name
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1, (name, lines)
        command = "pretrain" if name in ("resume", "init-from") else name
        assert lines[0].startswith(f"m3i {command}: error: {carrier}: "), (name, lines)
        assert "refused" in lines[0] or "not a readable safetensors file" in lines[0]
        assert not marker.exists(), f"the payload ran in `m3i {name}`"
    assert not (tmp_path / "vit.safetensors").exists() and not (tmp_path / "next" / "checkpoints").exists()


@pytest.mark.slow
def test_a_forged_state_json_is_refused(trained, tmp_path, capsys):
    run, data = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    state = ckpt.find(copy) / ckpt.STATE_FILE
    doc = json.loads(state.read_text())
    doc["optimizer"] = {"$object": "os.system", "args": ["true"]}
    state.write_text(json.dumps(doc))
    assert main(["pretrain", "--resume", str(copy), "--no-progress", "--steps", "3"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"m3i pretrain: error: {state}: unexpected entry")
    # export and eval never read the training state, so they still work
    assert main(commands(copy, data, tmp_path)["export"]) == 0


def test_training_state_round_trips_exactly():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        sched.step()
    random.random(), np.random.rand()
    state = {"step": 3, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ckpt.rng_state(),
             "nan": float("nan")}
    tensors = {}
    doc = json.loads(json.dumps(ckpt.to_json(state, tensors)))
    back = ckpt.from_json(doc, tensors, "state.json")
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # betas stay a tuple
    for i, s in state["optimizer"]["state"].items():  # integer keys survive
        assert all(torch.equal(v, back["optimizer"]["state"][i][k]) for k, v in s.items())
    assert back["scheduler"] == state["scheduler"] and back["nan"] != back["nan"]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"]) and back["rng"]["python"] == state["rng"]["python"]
    a, b = state["rng"]["numpy"], back["rng"]["numpy"]
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and b[1].dtype == np.uint32 and a[2:] == b[2:]
    ckpt.set_rng_state(back["rng"])  # accepted by torch, numpy and random
    with pytest.raises(TypeError, match="Payload"):
        ckpt.to_json({"x": Payload("/nonexistent")}, {})


def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # the checkpoint does not even exist: the output is checked first
    assert main(["export", "--checkpoint", str(tmp_path / "no-run"), "--out", str(blocker / "vit.safetensors")]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"m3i export: error: --out {blocker / 'vit.safetensors'}: cannot write into {blocker}")
    assert main(["eval", "--checkpoint", str(tmp_path / "no-run"), "--task", "knn", "--dataset", "fashion-mnist",
                 "--json", str(blocker / "r.json")]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"m3i eval: error: --json {blocker / 'r.json'}: cannot write into {blocker}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["export", "--checkpoint", str(tmp_path / "no-run"), "--out", str(ro / "vit.safetensors")]) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert f"cannot write into {ro} (Permission denied)" in line
    finally:
        ro.chmod(0o700)


def test_a_sharded_optimizer_index_is_checked_before_torch_unpickles_it(tmp_path):
    """FSDP runs keep the optimizer state in torch.distributed.checkpoint's format, whose index
    torch unpickles as it is: m3i reads the names it would import first, without running it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    folder = tmp_path / "optimizer"
    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(folder))
    ckpt._check_sharded_index(folder / ".metadata")  # the real index passes

    marker = tmp_path / "payload-ran"
    import pickle
    (folder / ".metadata").write_bytes(pickle.dumps({"index": Payload(marker)}))
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"\.metadata: refused: it names posix\.system"):
        ckpt._check_sharded_index(folder / ".metadata")
    (folder / "evil.pt").write_bytes(b"")
    with pytest.raises(ckpt.UnsafeCheckpointError, match="evil.pt: refused"):
        ckpt._verify_sharded(folder)
    assert not marker.exists()
