"""Checkpoints: weights as safetensors, the rest of the training state beside them.

Layout of a run directory::

    DIR/config.yaml                    the resolved recipe
    DIR/metrics.jsonl                  one JSON object per logged step
    DIR/checkpoints/step_000200/       model.safetensors + state.pt (optimizer, scheduler, RNG, step)
    DIR/checkpoints/step_000200/optimizer/   FSDP runs: the optimizer state, sharded (torch.distributed.checkpoint)
    DIR/checkpoints/latest             name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, and ``latest`` is
replaced atomically afterwards, so a crash while saving leaves the previous one whole.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODEL_FILE, STATE_FILE = "model.safetensors", "state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep: int = 2,
         extra: dict[str, Path] | None = None) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints. ``extra``:
    folders already written (a sharded optimizer state) moved into the checkpoint under these names."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / MODEL_FILE),
              metadata={"format": "pt", "step": str(step)})
    torch.save(state, tmp / STATE_FILE)
    for name, folder in (extra or {}).items():
        os.replace(folder, tmp / name)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find(path: Path) -> Path:
    """A run directory or a checkpoint directory -> the checkpoint directory to load."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        ckpt = path / "checkpoints" / latest.read_text().strip()
        if (ckpt / MODEL_FILE).is_file():
            return ckpt
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    raise FileNotFoundError(f"{path}: holds no checkpoint (expected {MODEL_FILE} or checkpoints/latest)")


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    ckpt = find(path)
    weights = load_file(str(ckpt / MODEL_FILE))
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False) if (ckpt / STATE_FILE).is_file() else {}
    return weights, state


def load_weights_into(module: torch.nn.Module, weights: dict[str, torch.Tensor], where: str,
                      optional_prefixes: tuple[str, ...] = ()) -> None:
    """Load with a clear message when the checkpoint was made for another model shape."""
    own = module.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in weights.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in weights and not k.startswith(optional_prefixes)]
    unexpected = [k for k in weights if k not in own]
    if wrong or missing or unexpected:
        parts = []
        if wrong:
            parts.append("shapes differ: " + "; ".join(wrong[:4]))
        if missing:
            parts.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown tensors, e.g. {unexpected[:3]}")
        raise ValueError(f"{where}: the checkpoint was made for another model shape or recipe ({'; '.join(parts)})")
    module.load_state_dict(weights, strict=False)
