"""Stop signals as schedulers and terminals deliver them: to the whole process group, DataLoader
workers included. SIGTERM and Ctrl-C save a checkpoint at the step reached and exit 0, the run
then resumes bitwise; Ctrl-C twice stops at once; under torchrun every rank saves its part.
Every run here is a real `m3i pretrain` child process (or torchrun's) in a session of its own;
a signal lands at a point of the run the test chooses (paused there, or seen in its own log),
never after a delay."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import HANG, needs_data
from faultkit import ENV, Child, error_lines, final_weights, finished_run, image_folder, m3i_cmd, metrics, pretrain_args, run_m3i
from m3i.cli import main
from m3i.runs import checkpoint as ckpt

STEPS = 40
# no periodic checkpoint: the one a stop signal writes is the only one there is
SETTINGS = (f"train.steps={STEPS}", "train.ckpt_every=1000", "data.num_workers=2")

# the first Ctrl-C handled, the child says so (a marker file) and waits inside the handler until
# the test presses Ctrl-C again or lets it go on (a second file, MARKER.go): so the second press
# lands after the first one was seen, as a person's does
HOLD_AFTER_FIRST_SIGINT = """
import os, pathlib, signal, time
from m3i.train import signals
# Ctrl-C reaches a terminal's foreground job, even where the suite itself runs as a background job
# (which starts with SIGINT ignored, and m3i keeps an ignored SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
handle = signals.Preemption._handle
def held(self, signum, frame):
    first = self.requested is None
    handle(self, signum, frame)
    if first:
        marker = pathlib.Path(os.environ["FAULT_MARKER"])
        marker.touch()
        while not marker.with_name(marker.name + ".go").exists():
            time.sleep(0.01)
signals.Preemption._handle = held
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return finished_run(out, data, *SETTINGS)


class Launch:
    """A command (torchrun) in a session (process group) of its own, stdout and stderr in files."""

    def __init__(self, cmd: list[str], tmp: Path, env: dict):
        self.out, self.err = tmp / "stdout", tmp / "stderr"
        with self.out.open("w") as o, self.err.open("w") as e:
            self.proc = subprocess.Popen(cmd, env=env, stdout=o, stderr=e, start_new_session=True)

    def poll(self) -> int | None:
        return self.proc.poll()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self) -> int:
        return self.proc.wait(timeout=HANG)


def wait_until(child: Child | Launch, ready, what: str) -> None:
    """Poll the run's own files until ``ready()`` holds; the run must still be going."""
    while not ready():
        assert child.poll() is None, f"the run ended before {what}: {child.stderr()[-2000:]}"
        time.sleep(0.01)


def latest_step(run: Path) -> int:
    _, state = ckpt.load(run)  # loads whole (weights and training state)
    return int(state["step"])


def assert_bitwise(reference: Path, run: Path) -> None:
    ref, got = final_weights(reference), final_weights(run)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(reference)]


@pytest.mark.slow
def test_group_sigterm_with_two_workers_saves_where_it_stopped_exits_0_and_resumes_bitwise(data, reference,
                                                                                            tmp_path):
    run = tmp_path / "run"
    # the signal reaches every process of the run, its 2 workers included, before the update of
    # step 5, which completes; the run saves step 5 and stops
    with Child(*pretrain_args(run, data, *SETTINGS), pause="step@5", session=True) as child:
        assert child.paused(), child.stderr()
        child.signal_group(signal.SIGTERM)
        child.release()
        assert child.wait() == 0, child.stderr()[-3000:]
        out, err = child.stdout(), child.stderr()
    assert latest_step(run) == 5 and metrics(run)[-1]["step"] == 5
    assert f"SIGTERM at step 5: saved {run / 'checkpoints' / 'step_000005'}; continue with " \
           f"`m3i pretrain --resume {run}`" in out
    assert error_lines(err) == []

    finish = run_m3i("pretrain", "--resume", str(run), "--no-progress")
    assert finish.returncode == 0, finish.stderr
    assert_bitwise(reference, run)


def pressed_ctrl_c(run: Path, data: Path, marker: Path) -> Child:
    """A run into ``run``, Ctrl-C pressed while it trains (paused once step 3 is logged); returned
    once the run has seen it and waits in its handler (go on: :func:`let_go`)."""
    child = Child(*pretrain_args(run, data, *SETTINGS), pause="log@3", wrapper=HOLD_AFTER_FIRST_SIGINT,
                  session=True, env={**ENV, "FAULT_MARKER": str(marker)})
    assert child.paused(), child.stderr()
    child.signal_group(signal.SIGINT)
    wait_until(child, marker.exists, "the Ctrl-C was seen")
    return child


def let_go(child: Child, marker: Path) -> None:
    """The run held by :func:`pressed_ctrl_c` leaves its handler and its pause, and goes on."""
    marker.with_name(marker.name + ".go").touch()
    child.release()


@pytest.mark.slow
@needs_data  # the demo's quality line scores Fashion-MNIST
def test_ctrl_c_once_saves_and_the_demo_goes_on_with_it_twice_stops_at_once(data, reference, tmp_path, capsys,
                                                                          monkeypatch):
    # twice: the second press ends the run at once, saving nothing (exit 130, one line)
    run = tmp_path / "twice"
    with pressed_ctrl_c(run, data, tmp_path / "twice-seen") as child:
        child.signal_group(signal.SIGINT)
        assert child.wait() == 130
        # (a worker whose batch transfer the main process dropped may add its own traceback)
        assert "interrupted" in error_lines(child.stderr()), child.stderr()
    assert not (run / "checkpoints").exists()

    # once: saved at the step reached, exit 0
    cwd = tmp_path / "cwd"
    run = cwd / "runs" / "demo"
    with pressed_ctrl_c(run, data, tmp_path / "once-seen") as child:
        let_go(child, tmp_path / "once-seen")
        assert child.wait() == 0, child.stderr()[-3000:]
        out = child.stdout()
    stopped = latest_step(run)
    assert stopped < STEPS and stopped == metrics(run)[-1]["step"] and f"SIGINT at step {stopped}: saved" in out

    # the demo (`m3i pretrain`, no argument) goes on with an unfinished runs/demo, to the same end
    demo = subprocess.run(m3i_cmd("pretrain", "--no-progress"), env=ENV, cwd=cwd, capture_output=True, text=True,
                          timeout=HANG)
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.startswith(f"m3i demo: runs/demo holds a run of recipe 'tiny' at step {stopped} of {STEPS}, "
                                  f"not finished; continuing it")
    assert_bitwise(reference, run)
    # and a finished one is reported, not trained again
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    monkeypatch.chdir(cwd)
    assert main(["pretrain", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("quality: Fashion-MNIST k-NN top-1")
    assert lines[1:] == [f"m3i demo: runs/demo holds a run of recipe 'tiny' at step {STEPS} of {STEPS}, finished; to "
                         f"train again: `m3i pretrain --overwrite` (moves it aside) or `m3i pretrain --out OTHER`"]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


RANK_EXIT = """
import os, pathlib, sys, time
from m3i.cli import main
if os.environ.get("PAUSE_DIR"):  # each rank says so and waits before step 4 until the test lets it go on
    from m3i.train import step as train_step
    call, here = train_step.TrainStep.__call__, pathlib.Path(os.environ["PAUSE_DIR"])
    def paused_call(self, batch, i):
        if i + 1 == 4:
            (here / f"rank{os.environ['RANK']}").touch()
            while not (here / "go").exists():
                time.sleep(0.01)
        return call(self, batch, i)
    train_step.TrainStep.__call__ = paused_call
code = main(sys.argv[1:])
pathlib.Path(os.environ["RANK_EXIT_DIR"], f"rank{os.environ['RANK']}").write_text(str(code))
sys.exit(code)
"""


def torchrun(args: list[str], tmp: Path, pause: Path | None = None) -> tuple[Launch, Path]:
    """``m3i ARGS`` on 2 gloo ranks under torchrun; each rank writes its exit code into the folder
    returned. ``pause``: a folder where each rank, before step 4, writes ``rankR`` and waits for ``go``."""
    tmp.mkdir()
    script, codes = tmp / "m3i_rank.py", tmp / "exit"
    script.write_text(RANK_EXIT)
    codes.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           args[0], "--device", "cpu", *args[1:]]  # gloo, also where a GPU is
    env = {**ENV, "RANK_EXIT_DIR": str(codes), **({"PAUSE_DIR": str(pause)} if pause else {})}
    return Launch(cmd, tmp, env), codes


def rank_exits(codes: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(codes.iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_group_sigterm_under_torchrun_every_rank_saves_the_same_step_and_resumes_bitwise(data, tmp_path, strategy):
    settings = (*SETTINGS, f"train.strategy={strategy}")
    ref = tmp_path / "ref"
    job, codes = torchrun(pretrain_args(ref, data, *settings), tmp_path / "t-ref")
    assert job.wait() == 0, job.stderr()[-3000:]

    run, pause = tmp_path / "run", tmp_path / "pause"
    pause.mkdir()
    job, codes = torchrun(pretrain_args(run, data, *settings), tmp_path / "t-run", pause)
    wait_until(job, lambda: (pause / "rank0").exists() and (pause / "rank1").exists(), "both ranks at step 4")
    os.killpg(job.proc.pid, signal.SIGTERM)  # torchrun passes it on to each rank's process group
    (pause / "go").touch()
    job.wait()  # torchrun's own exit code reports the signal it got
    assert rank_exits(codes) == {"rank0": "0", "rank1": "0"}, job.stderr()[-3000:]
    _, state = ckpt.load(run)
    stopped = int(state["step"])
    assert 3 <= stopped < STEPS and stopped == metrics(run)[-1]["step"]
    assert len(state["rng"]) == 2  # each rank's random state, saved at the one step they agreed on
    if strategy == "fsdp":  # and each rank's shard of the optimizer state
        shards = sorted(p.name for p in (run / "checkpoints" / f"step_{stopped:06d}" / "optimizer").iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert f"SIGTERM at step {stopped}: saved" in job.out.read_text()

    job, codes = torchrun(["pretrain", "--resume", str(run), "--no-progress"], tmp_path / "t-resume")
    assert job.wait() == 0, job.stderr()[-3000:]
    assert rank_exits(codes) == {"rank0": "0", "rank1": "0"}
    assert_bitwise(ref, run)
