"""One run at a time into a run directory: an advisory lock on ``DIR/.lock``.

A POSIX record lock (``lockf``): the kernel drops it when its process ends in any way (SIGKILL
included), and, unlike ``flock``, forked DataLoader workers do not hold it on, so a killed run
never leaves a stale lock behind and ``--resume`` can take it at once. A run that ends having
written nothing (a failed start) removes the lock file, and the folder if it made it.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another process is writing into the run directory (the message names it)."""


def locked(run_dir: Path, pid: str) -> RunLockedError:
    return RunLockedError(f"{run_dir}: another m3i run (pid {pid}) is writing into this directory; "
                          f"wait for it to end or choose another --out")


def _holder(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"


def held_by(run_dir: str | Path) -> str | None:
    """The pid of another live process that holds ``DIR/.lock``, or None; the file is left as it
    is. (A POSIX lock is the process's: never ask this of a folder this process has locked.)"""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return _holder(fd) if e.errno in (errno.EACCES, errno.EAGAIN) else None
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None
        self._made = False

    def __enter__(self) -> RunLock:
        self._made = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"{self.path.parent}: cannot write the run directory ({e.strerror}); "
                             f"choose another --out") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise ValueError(f"{self.path}: cannot be locked ({e.strerror})") from None
            holder = _holder(fd)
            os.close(fd)
            raise locked(self.path.parent, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            if [p.name for p in self.path.parent.iterdir()] == [LOCK_FILE]:  # nothing written: no trace left
                self.path.unlink()
                if self._made:
                    self.path.parent.rmdir()
        except OSError:
            pass
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
