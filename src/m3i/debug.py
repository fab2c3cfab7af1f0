"""Debug mode: the checks that need a tensor's values on the host, and so make the host wait for
the device, run only with ``M3I_DEBUG=1`` in the environment. Without it the training step reads
nothing back (shapes are fixed by the configuration, not by the data)."""
from __future__ import annotations

import os


def enabled() -> bool:
    """Whether the value-reading checks run (``M3I_DEBUG`` set to anything but ``0``)."""
    return os.environ.get("M3I_DEBUG", "") not in ("", "0")
