"""Stop signals: a run asked to stop saves a checkpoint at the step it reached and returns.

SIGTERM is what schedulers send before they preempt or cancel a job (SLURM, ``timeout``,
Kubernetes), usually to the whole process group, DataLoader workers included; Ctrl-C sends
SIGINT to the terminal's whole foreground group. So the main process of each rank asks the
loop to save and return, and the DataLoader workers ignore both signals (:func:`worker_init`):
they go on serving batches until the loop is done and closes them. Ctrl-C pressed a second time
stops at once (``KeyboardInterrupt``).
"""
from __future__ import annotations

import signal
import threading

import torch

from .. import distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the training DataLoader: the stop signals are the main process's."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Preemption:
    """Installed for the run, the previous handlers restored after it. ``requested``: the name
    of the first stop signal received (``"SIGTERM"``, ``"SIGINT"``), else None."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGINT of a background job
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        self.requested = self.requested or signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (a collective with several ranks: every rank then
        stops at the same step)."""
        if dist.world_size() == 1:
            return self.requested is not None
        return not bool(dist.all_ranks(torch.tensor(self.requested is None, device=device)))
