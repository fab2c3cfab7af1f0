"""Shared pieces of the fault suite: a tiny recipe, a tiny image folder, and `m3i` as a child
process (``sys.executable -m m3i.cli``, so the same sources and environment are used).

A fault lands where the test chooses it from the run's progress, never after a wall-clock delay:
:class:`Child` runs ``m3i ARGS`` and, given ``pause="POINT@STEP"``, the child stops at that point
of its run, says so, and waits for the test, which then kills it, signals it, or lets it go on::

    with Child(*pretrain_args(run, data), pause="log@5") as child:
        assert child.paused(), child.stderr()   # False: the run ended without reaching the point
        child.kill()                            # SIGKILL there; or child.signal(SIGTERM); child.release()

The points (``STEP`` is the step the loop counts: the first update is step 1; a ``log`` point
needs a step the run logs, the others but ``step`` one it checkpoints):

- ``step``: before the update of step ``STEP`` runs (with ``train.ckpt_every=1`` the newest
  checkpoint is then ``STEP - 1``'s).
- ``log``: step ``STEP``'s line just appended to metrics.jsonl, its checkpoint not yet begun.
- ``files``: inside step ``STEP``'s checkpoint write: the weights and optimizer files written
  into ``.step_NNNNNN.tmp``, ``state.json`` not yet, nothing renamed.
- ``pointer``: inside that write: the folder renamed into place, ``latest`` not yet replaced.
- ``saved``: step ``STEP``'s checkpoint whole and ``latest``, the next update not yet begun.

The child pauses once. ``wrapper`` code of the test's own (see :func:`m3i_cmd`) runs after the
pause is installed. The child tells the test through a pipe of its own and waits on its stdin; if
the test goes away (stdin closed) the paused child exits, so none outlives a failed test.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import HANG  # how long a child may take to reach its pause point or to end

RECIPE = str(Path(__file__).with_name("tiny.yaml"))
# a run in a child process: one thread, so that runs are bitwise reproducible and cheap
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def image_folder(root: Path, per_class: int = 12, classes: str = "ab", size: int = 16, seed: int = 0) -> Path:
    """Class subfolders of small random PNGs."""
    g = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    return root


def source_override(*specs: str) -> str:
    return "data.sources=[" + ", ".join("{spec: " + json.dumps(s) + "}" for s in specs) + "]"


def pretrain_args(out: Path, data: Path, *overrides: str, options: tuple[str, ...] = ()) -> list[str]:
    return ["pretrain", "--recipe", RECIPE, "--out", str(out), "--no-progress", *options,
            source_override(f"folder:{data}"), *overrides]


def m3i_cmd(*args: str, wrapper: str | None = None) -> list[str]:
    """The command line of ``m3i ARGS`` in a child process; ``wrapper`` is Python code run
    first in that process (a fault to inject) before the command line's own ``main``."""
    if wrapper is None:
        return [sys.executable, "-m", "m3i.cli", *args]
    code = wrapper + "\nimport sys\nfrom m3i.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", code, *args]


POINTS = ("step", "log", "files", "pointer", "saved")


def _pause(point: str, step: int, fd: int) -> None:
    """Run in the child (see :class:`Child`): install the pause at ``point`` of step ``step``."""
    import pathlib

    from m3i.runs import checkpoint
    from m3i.train import hooks
    from m3i.train import step as train_step

    name, done = f"step_{step:06d}", []

    def pause():
        if done:
            return
        done.append(True)
        os.write(fd, f"paused {point}@{step}\n".encode())
        # wait in Python, not blocked in read(): a signal the test sends meanwhile may reach any of
        # the process's threads, and Python runs its handler only when the main thread runs
        while not select.select([sys.stdin], [], [], 0.05)[0]:
            pass
        if not sys.stdin.readline():  # stdin closed: the test has gone
            os._exit(3)

    if point == "step":
        call = train_step.TrainStep.__call__

        def paused_call(self, batch, i):
            if i + 1 == step:
                pause()
            return call(self, batch, i)
        train_step.TrainStep.__call__ = paused_call
    elif point == "log":
        write = hooks.MetricLog.write

        def paused_write(self, record):
            write(self, record)
            if record["step"] == step:
                pause()
        hooks.MetricLog.write = paused_write
    elif point == "files":
        save_file = checkpoint.save_file

        def paused_save_file(tensors, filename, metadata=None):
            save_file(tensors, filename, metadata=metadata)
            if filename.endswith(checkpoint.OPTIMIZER_FILE) and f".{name}.tmp" in filename:
                pause()
        checkpoint.save_file = paused_save_file
    elif point == "pointer":
        write_text = pathlib.Path.write_text

        def paused_write_text(self, data, *a, **k):
            if self.name == ".latest.tmp" and data.strip() == name:
                pause()
            return write_text(self, data, *a, **k)
        pathlib.Path.write_text = paused_write_text
    elif point == "saved":
        save = checkpoint.save

        def paused_save(run_dir, at, *a, **k):
            out = save(run_dir, at, *a, **k)
            if at == step:
                pause()
            return out
        checkpoint.save = paused_save
    else:
        raise ValueError(f"pause point {point!r}: expected one of {', '.join(POINTS)}")


class Child:
    """``m3i ARGS`` in a child process, paused at ``pause="POINT@STEP"`` if given (see the module's
    docstring); ``wrapper``: more Python code run first in the child, as in :func:`m3i_cmd`;
    ``session``: in a session (process group) of its own, for :meth:`signal_group`.
    stdout and stderr go to files (a chatty child never blocks on a full pipe). As a context
    manager, a child still running at the end is killed."""

    def __init__(self, *args: str, pause: str | None = None, wrapper: str | None = None, env: dict | None = None,
                 session: bool = False):
        self.pause = pause
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        code, fds, self._said = wrapper or "", (), None
        if pause is not None:
            point, _, step = pause.partition("@")
            if point not in POINTS or not step.isdigit():
                raise ValueError(f"pause={pause!r}: expected POINT@STEP, POINT one of {', '.join(POINTS)}")
            self._said, said = os.pipe()
            fds = (said,)
            here = Path(__file__).parent
            code = (f"import sys\nsys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]\nimport faultkit\n"
                    f"faultkit._pause({point!r}, {int(step)}, {said})\n" + code)
        self.proc = subprocess.Popen(m3i_cmd(*args, wrapper=code or None), env=env or ENV, stdin=subprocess.PIPE,
                                     stdout=self._out, stderr=self._err, text=True, pass_fds=fds,
                                     start_new_session=session)
        if fds:
            os.close(fds[0])

    def paused(self, timeout: float = HANG) -> bool:
        """Wait until the child pauses (True) or ends without reaching its point (False)."""
        assert self._said is not None, "no pause point given"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([self._said], [], [], 1.0)
            if ready:
                line = os.read(self._said, 256).decode()
                if line:
                    assert line == f"paused {self.pause}\n", line
                    return True
                self.proc.wait(timeout=HANG)
                return False  # the pipe closed: the child ended
            if self.proc.poll() is not None:
                return False
        raise AssertionError(f"m3i did not reach {self.pause} nor end within {timeout:.0f} s (hung?): "
                             f"{self.stderr()[-2000:]}")

    def release(self) -> None:
        """Let a paused child go on."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """To the child's whole process group (``session=True``), DataLoader workers included: what
        ``kill -SIG -- -PGID``, SLURM and a terminal's Ctrl-C do."""
        os.killpg(self.proc.pid, sig)

    def kill(self) -> int:
        """SIGKILL, and wait for it to end."""
        self.proc.send_signal(signal.SIGKILL)
        return self.wait()

    def wait(self, timeout: float = HANG) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"m3i did not end within {timeout:.0f} s (hung?): {self.stderr()[-2000:]}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def stdout(self) -> str:
        self._out.seek(0)
        return self._out.read()

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin:
            self.proc.stdin.close()
        if self._said is not None:
            os.close(self._said)
        self._out.close()
        self._err.close()


def run_m3i(*args: str, timeout: float = HANG, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(m3i_cmd(*args), env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


def finished_run(out: Path, data: Path, *overrides: str) -> Path:
    """``out`` after an uninterrupted ``m3i pretrain`` of the tiny recipe on ``data`` (it must succeed)."""
    done = run_m3i(*pretrain_args(out, data, *overrides))
    assert done.returncode == 0, done.stderr
    return out


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines of stderr (warnings of libraries excluded)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and "Warning" not in ln and not ln.startswith("  ")]


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
