"""Memory a command needs against what the device has: a size far beyond it is refused up front,
with the estimate, rather than ending in the allocator's traceback or the kernel's OOM kill."""
from __future__ import annotations

import os

import torch


def device_bytes(device: torch.device | str) -> int:
    """The memory of ``device``: a GPU's own, else the machine's RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device.index or 0).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def require(need: int, device: torch.device | str, what: str) -> None:
    """Raise a one-line ValueError when ``need`` bytes exceed the memory of ``device``; ``what``
    says what needs them (it starts the message)."""
    have = device_bytes(device)
    if need > have:
        where = "GPU" if torch.device(device).type == "cuda" else "machine"
        raise ValueError(f"{what} needs at least {human(need)} of memory, more than the {human(have)} of this "
                         f"{where}; choose a smaller size")
