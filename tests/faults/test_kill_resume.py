"""Interrupted runs: SIGKILL at random points and inside a checkpoint write, SIGTERM, and two
runs into one directory. Every run here is a real `m3i pretrain` child process."""
from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from faultkit import ENV, error_lines, final_weights, image_folder, m3i_cmd, metrics, pretrain_args, run_m3i
from m3i.train import checkpoint as ckpt

STEPS = 40
KILLS = 10  # in all: two inside checkpoint writes, the others at random points

# pauses the child inside the checkpoint write of step $FAULT_STEP, at $FAULT_AT: "files" (the
# weights and optimizer files written, state.json not yet, nothing renamed) or "pointer" (the
# folder renamed into place, `latest` not yet replaced); it touches $FAULT_MARKER and waits
PAUSE_IN_SAVE = """
import os, pathlib, time
from m3i.train import checkpoint
step, at, marker = os.environ["FAULT_STEP"], os.environ["FAULT_AT"], os.environ["FAULT_MARKER"]
def pause():
    pathlib.Path(marker).touch()
    time.sleep(600)
real_save_file = checkpoint.save_file
def save_file(tensors, filename, metadata=None):
    real_save_file(tensors, filename, metadata=metadata)
    if at == "files" and filename.endswith(checkpoint.OPTIMIZER_FILE) and f"step_{int(step):06d}" in filename:
        pause()
checkpoint.save_file = save_file
real_write_text = pathlib.Path.write_text
def write_text(self, data, *a, **k):
    if at == "pointer" and self.name == ".latest.tmp" and data.strip() == f"step_{int(step):06d}":
        pause()
    return real_write_text(self, data, *a, **k)
pathlib.Path.write_text = write_text
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    done = run_m3i(*pretrain_args(out, data, f"train.steps={STEPS}"))
    assert done.returncode == 0, done.stderr
    return out


def latest_step(run: Path) -> int:
    """The step of the newest checkpoint; loading it whole (weights and state) must succeed."""
    try:
        weights, state = ckpt.load(run)
    except FileNotFoundError:
        return 0
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    return int(state["step"])


def pointer(run: Path) -> str:
    """What `latest` names (cheap to poll)."""
    try:
        return (run / "checkpoints" / "latest").read_text()
    except FileNotFoundError:
        return ""


def start(run: Path, data: Path, wrapper: str | None = None, env: dict | None = None) -> subprocess.Popen:
    args = (["pretrain", "--resume", str(run), "--no-progress"] if latest_step(run)
            else pretrain_args(run, data, f"train.steps={STEPS}"))
    return subprocess.Popen(m3i_cmd(*args, wrapper=wrapper), env=env or ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_sigkill_at_random_points_and_inside_checkpoint_writes_then_resume_bitwise(data, reference, tmp_path):
    run = tmp_path / "run"
    rng = random.Random(0)
    kills, steps_at_kill = 0, []

    # SIGKILL inside two checkpoint writes (at both points that matter), then resume
    for at, step in (("files", 3), ("pointer", 6)):
        marker = tmp_path / f"paused-{at}"
        env = {**ENV, "FAULT_STEP": str(step), "FAULT_AT": at, "FAULT_MARKER": str(marker)}
        proc = start(run, data, wrapper=PAUSE_IN_SAVE, env=env)
        assert wait_for(marker.exists, proc), proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        # the write was cut: `latest` still names the previous checkpoint, which loads whole
        assert latest_step(run) == step - 1
        if at == "files":
            assert (run / "checkpoints" / f".step_{step:06d}.tmp").is_dir()  # the cut write's leftovers
        else:
            assert (run / "checkpoints" / f"step_{step:06d}").is_dir()  # renamed, but not yet `latest`

    # SIGKILL at random points: after the run made progress, a random delay later
    while kills < KILLS:
        before = pointer(run)
        proc = start(run, data)
        if not wait_for(lambda before=before: pointer(run) not in ("", before), proc):
            break  # it finished
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode != -signal.SIGKILL:
            break  # it had finished before the signal
        kills += 1
        steps_at_kill.append(latest_step(run))  # never unreadable (latest_step loads it)
    assert kills >= KILLS, f"only {kills} kills landed before the run ended (at steps {steps_at_kill})"
    assert steps_at_kill[-1] < STEPS

    finish = run_m3i("pretrain", "--resume", str(run), "--no-progress")
    assert finish.returncode == 0, finish.stderr
    assert latest_step(run) == STEPS
    ref, got = final_weights(reference), final_weights(run)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k  # bitwise
    # the optimizer state too, and the logged losses of every step
    _, ref_state = ckpt.load(reference)
    _, got_state = ckpt.load(run)
    for i, s in ref_state["optimizer"]["state"].items():
        for name, v in s.items():
            assert torch.equal(v, got_state["optimizer"]["state"][i][name]), (i, name)
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(reference)]
    print(f"{kills} SIGKILLs survived: 2 inside checkpoint writes, then at steps {steps_at_kill}")


def test_sigterm_saves_exits_0_and_the_run_resumes_bitwise(data, reference, tmp_path):
    run = tmp_path / "run"
    # checkpoints only at the end: the one SIGTERM writes is the only one there is
    proc = subprocess.Popen(m3i_cmd(*pretrain_args(run, data, f"train.steps={STEPS}", "train.ckpt_every=1000")),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    stopped = latest_step(run)
    assert 3 <= stopped < STEPS and stopped % 1000
    assert f"SIGTERM at step {stopped}: saved {run / 'checkpoints' / f'step_{stopped:06d}'}" in out
    assert f"--resume {run}" in out

    finish = run_m3i("pretrain", "--resume", str(run), "--no-progress")
    assert finish.returncode == 0, finish.stderr
    ref, got = final_weights(reference), final_weights(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_second_run_into_the_same_directory_is_refused(data, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(m3i_cmd(*pretrain_args(run, data, "train.steps=100000", "train.ckpt_every=1000")),
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 1, first)
        written = (run / "metrics.jsonl").read_text()
        second = run_m3i(*pretrain_args(run, data, "train.steps=5"))
        assert second.returncode == 1
        assert error_lines(second.stderr) == [
            f"m3i pretrain: error: {run}: another m3i run (pid {first.pid}) is writing into this directory; "
            f"wait for it to end or choose another --out"]
        assert (run / "metrics.jsonl").read_text().startswith(written)  # the first run's log is untouched
        assert first.poll() is None  # and it still runs
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
