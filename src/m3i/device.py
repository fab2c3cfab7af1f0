"""The one place a ``--device`` is read: a name torch knows and a device this machine has, or a
one-line error saying which are there."""
from __future__ import annotations

import torch


def available() -> list[str]:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``--device`` -> a torch device: ``None`` is cuda where there is one, else cpu. A name torch
    does not know, or a device this machine (or this build of torch) lacks, raises ValueError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = ", ".join(available())
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name}: not a device name; this machine has {have}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this build of torch has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {name}: {why} (torch {torch.__version__}); this machine has {have}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} GPUs; this machine has {have}")
    elif dev.type == "mps" and "mps" not in have:
        raise ValueError(f"--device {name}: no MPS device; this machine has {have}")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: m3i runs on cpu, cuda or mps; this machine has {have}")
    return dev
