"""Several gloo ranks on the CPU for the tests of the distributed path: ``run_ranks(fn, *args)``
runs ``fn(rank, *args)`` in ``world`` fresh processes and fails the test if any rank fails.

- Rendezvous that cannot collide. ``rendezvous="file"`` starts the process group from a file of
  the test's own temporary folder before ``fn`` runs. ``rendezvous="env"`` sets what torchrun
  sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...), so the trainer's ``setup_device``
  starts the group itself; as under torchrun, the store is hosted by the launcher (here the
  test process), on a port the system picked when it bound it, held for the whole run: no port
  is chosen and then released for another process to take.
- A time-out: a rank still running after ``timeout`` seconds (a hang: a rank waiting for one
  that never comes) is killed and the test fails saying so (conftest.HANG: a guard against hangs
  only, far beyond what any run here takes on a slow, loaded machine).
- Each rank's own error. A rank's stderr goes to a file of its own, with its Python traceback
  on an exception and faulthandler's stack of every thread on a fatal signal (SIGABRT, SIGSEGV);
  a failure reports every rank: its exit (code or signal) and the end of its stderr. The ranks'
  stderr is copied to the test's afterwards, failed or not.
- The process group is destroyed on every rank before it exits, after a success or a failure.
"""
from __future__ import annotations

import faulthandler
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from conftest import HANG

GRACE = 60.0  # s: after a rank fails, how long the others get to end with their own error


def _rank_main(rank: int, world: int, fn, args: tuple, log: str, rendezvous: str, where: str):
    with open(log, "w") as err:
        os.dup2(err.fileno(), 2)  # this rank's own stderr, C++ messages included
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    torch.set_num_threads(1)
    try:
        if rendezvous == "file":
            tdist.init_process_group("gloo", init_method=f"file://{where}", rank=rank, world_size=world)
        else:  # what torchrun sets for its workers; the store is the launcher's
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                              LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=where,
                              TORCHELASTIC_USE_AGENT_STORE="True")
        fn(rank, *args)
        failed = False
    except BaseException:
        traceback.print_exc()
        failed = True
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
        sys.stderr.flush()
    if failed:
        raise SystemExit(1)


def _exit(code: int | None) -> str:
    if code is None:
        return "still running: killed"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def run_ranks(fn, *args, world: int = 2, rendezvous: str = "file", timeout: float = HANG,
              start_method: str = "spawn") -> None:
    """Run ``fn(rank, *args)`` on ``world`` gloo ranks; return when every rank has returned, else
    fail naming each rank's error. ``start_method="spawn"``: fresh processes (``fn`` and ``args``
    picklable); ``"fork"``: copies of the test process, which start without importing anything."""
    if rendezvous not in ("file", "env"):
        raise ValueError(f"rendezvous={rendezvous!r}: expected 'file' or 'env'")
    ctx = mp.get_context(start_method)
    with tempfile.TemporaryDirectory(prefix="m3i-ranks-") as tmp:
        store = None
        if rendezvous == "file":
            where = str(Path(tmp) / "rendezvous")
        else:  # bound to a port of the system's choosing and held until every rank has ended
            store = tdist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=timeout))
            where = str(store.port)
        logs = [str(Path(tmp) / f"rank{r}.stderr") for r in range(world)]
        procs = [ctx.Process(target=_rank_main, args=(r, world, fn, args, logs[r], rendezvous, where),
                             name=f"rank{r}") for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        running = {p.sentinel: p for p in procs}
        while running and time.monotonic() < deadline:
            for s in multiprocessing.connection.wait(list(running), timeout=max(0.0, deadline - time.monotonic())):
                running.pop(s).join()
            if running and any(p.exitcode for p in procs):  # one failed: the others end soon
                deadline = min(deadline, time.monotonic() + GRACE)
        hung = list(running.values())
        for p in hung:
            p.kill()
            p.join()
        codes = [None if p in hung else p.exitcode for p in procs]
        del store
        texts = [Path(log).read_text(errors="replace") if os.path.exists(log) else "" for log in logs]
    for r, text in enumerate(texts):
        if text:
            sys.stderr.write("".join(f"[rank {r}] {ln}\n" for ln in text.splitlines()))
    if any(c != 0 for c in codes):
        failed = any(codes)
        head = (f"{fn.__name__} failed on {world} gloo ranks" if failed else
                f"{fn.__name__} on {world} gloo ranks did not end within {timeout:.0f} s (a hang?)")
        lines = [head] + [f"--- rank {r}: {_exit(c)}\n{t[-3000:].rstrip() or '(no stderr)'}"
                          for r, (c, t) in enumerate(zip(codes, texts))]
        raise AssertionError("\n".join(lines))


def assert_ranks_average_to(one: dict[str, float], ranks: list[dict[str, float]]) -> None:
    """Each value of one process on the global batch (``one``) is DDP's mean over the ranks of each
    rank's share (``ranks``: one dict per rank), to float32 noise."""
    import pytest

    for key, value in one.items():
        mean = sum(r[key] for r in ranks) / len(ranks)
        assert mean == pytest.approx(value, rel=1e-5, abs=1e-6), key


def assert_grads_agree(one: dict, ranks: dict) -> None:
    """The gradients of several ranks (``ranks``, as DDP leaves them) equal those of one process on
    the global batch (``one``), to float32 noise: reordering a batch moves a gradient by ~1e-5 of its
    norm (more through batch norm), and one that is 0 in exact arithmetic by ~1e-6 of the largest."""
    assert set(ranks) == set(one)
    scale = max(float(g.norm()) for g in one.values())
    for key, grad in one.items():
        err = float((ranks[key] - grad).norm())
        assert err <= 1e-4 * float(grad.norm()) + 1e-6 * scale, f"{key}: |error| {err:.2e}, |grad| {grad.norm():.2e}"
