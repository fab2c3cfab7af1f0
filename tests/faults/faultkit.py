"""Shared pieces of the fault suite: a tiny recipe, a tiny image folder, and `m3i` as a child
process (``sys.executable -m m3i.cli``, so the same sources and environment are used)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

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


def run_m3i(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(m3i_cmd(*args), env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines of stderr (warnings of libraries excluded)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and "Warning" not in ln and not ln.startswith("  ")]


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
