"""Saved tensors into a module, with one message that says what does not fit; the mode of a written weights file."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def shared_mode(path: str | Path) -> None:
    """Give a written file the mode every other file gets (0666 less the umask): safetensors
    writes 0600, which a teammate or an upload tool running as another user cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def load_weights_into(module: torch.nn.Module, weights: dict[str, torch.Tensor], where: str,
                      optional_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``weights`` into ``module``; when they were saved from another model shape or recipe,
    one ValueError starting with ``where`` names the differing shapes, the missing tensors (those
    under ``optional_prefixes`` may be absent) and the unknown ones."""
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
