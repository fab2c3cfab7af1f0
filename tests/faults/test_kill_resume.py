"""Interrupted runs: SIGKILL at random steps and inside a checkpoint write, SIGTERM, and two
runs into one directory. Every run here is a real `m3i pretrain` child process, and every fault
lands at a point of the run chosen by the test (faultkit.Child), whatever the machine's speed."""
from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest
import torch

from faultkit import Child, error_lines, final_weights, finished_run, image_folder, metrics, pretrain_args, run_m3i
from m3i.runs import checkpoint as ckpt

STEPS = 40
KILLS = 10  # in all: two inside checkpoint writes, the others at random steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return finished_run(out, data, f"train.steps={STEPS}")


def latest_step(run: Path) -> int:
    """The step of the newest checkpoint; loading it whole (weights and state) must succeed."""
    try:
        weights, state = ckpt.load(run)
    except FileNotFoundError:
        return 0
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    return int(state["step"])


def start(run: Path, data: Path, pause: str) -> Child:
    """The run from scratch, or resumed from its newest checkpoint, to pause at ``pause``."""
    args = (["pretrain", "--resume", str(run), "--no-progress"] if latest_step(run)
            else pretrain_args(run, data, f"train.steps={STEPS}"))
    return Child(*args, pause=pause)


def kill_points(rng: random.Random) -> list[tuple[str, int]]:
    """Two kills inside checkpoint writes (at both points that matter), then the others at random
    steps, either before the step's update or between logging the step and checkpointing it."""
    steps = sorted(rng.sample(range(8, STEPS), KILLS - 2))
    return [("files", 3), ("pointer", 6)] + [(rng.choice(("step", "log")), s) for s in steps]


@pytest.mark.slow
def test_sigkill_at_random_points_and_inside_checkpoint_writes_then_resume_bitwise(data, reference, tmp_path):
    run = tmp_path / "run"
    points = kill_points(random.Random(0))
    for point, step in points:
        with start(run, data, pause=f"{point}@{step}") as child:
            assert child.paused(), f"the run ended before {point}@{step}: {child.stderr()[-2000:]}"
            assert child.kill() == -signal.SIGKILL
        # whatever was cut, `latest` names the previous checkpoint, which loads whole
        assert latest_step(run) == step - 1, (point, step)
        logged = [r["step"] for r in metrics(run)]
        if point == "files":
            assert (run / "checkpoints" / f".step_{step:06d}.tmp").is_dir()  # the cut write's leftovers
        elif point == "pointer":
            assert (run / "checkpoints" / f"step_{step:06d}").is_dir()  # renamed, but not yet `latest`
        elif point == "log":
            assert logged[-1] == step  # a line past the checkpoint, which the resumed run drops
        else:
            assert logged[-1] == step - 1

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
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(reference)]
    print(f"{len(points)} SIGKILLs survived, at {points}")


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_the_run_resumes_bitwise(data, reference, tmp_path):
    run = tmp_path / "run"
    # checkpoints only at the end: the one SIGTERM writes is the only one there is. It arrives
    # before the update of step 5, which completes; the run saves step 5 and stops
    with Child(*pretrain_args(run, data, f"train.steps={STEPS}", "train.ckpt_every=1000"), pause="step@5") as child:
        assert child.paused(), child.stderr()
        child.signal(signal.SIGTERM)
        child.release()
        assert child.wait() == 0, child.stderr()
        out = child.stdout()
    assert latest_step(run) == 5
    assert f"SIGTERM at step 5: saved {run / 'checkpoints' / 'step_000005'}" in out
    assert f"--resume {run}" in out

    finish = run_m3i("pretrain", "--resume", str(run), "--no-progress")
    assert finish.returncode == 0, finish.stderr
    ref, got = final_weights(reference), final_weights(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_a_second_run_into_the_same_directory_is_refused(data, tmp_path):
    run = tmp_path / "run"
    # the first run, paused once its step 2 is logged and saved, holds the directory
    with Child(*pretrain_args(run, data, "train.steps=4"), pause="saved@2") as first:
        assert first.paused(), first.stderr()
        written = (run / "metrics.jsonl").read_text()
        assert [r["step"] for r in metrics(run)] == [1, 2] and latest_step(run) == 2
        second = run_m3i(*pretrain_args(run, data, "train.steps=5"))
        assert second.returncode == 1
        assert error_lines(second.stderr) == [
            f"m3i pretrain: error: {run}: another m3i run (pid {first.pid}) is writing into this directory; "
            f"wait for it to end or choose another --out"]
        assert (run / "metrics.jsonl").read_text() == written  # the first run's log is untouched
        assert first.poll() is None  # and it still runs, to its end
        first.release()
        assert first.wait() == 0, first.stderr()
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4] and latest_step(run) == 4
