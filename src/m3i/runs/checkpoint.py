"""Checkpoints: tensors as safetensors, everything else as JSON; nothing is ever unpickled.

Layout of a run directory::

    DIR/config.yaml                    the resolved recipe
    DIR/metrics.jsonl                  one JSON object per logged step
    DIR/.lock                          held by the run writing into DIR
    DIR/checkpoints/step_000200/       one checkpoint, exactly these three files:
        model.safetensors                the weights (all that ``m3i eval`` and ``export`` read)
        optimizer.safetensors            the tensors of the training state (optimizer moments, RNG)
        state.json                       the rest of it (step, scheduler, counters, recipe), with
                                         ``{"$tensor": KEY}`` where a tensor of optimizer.safetensors goes
        optimizer/                       FSDP runs only: the optimizer state, sharded
                                         (torch.distributed.checkpoint: *.distcp + .metadata)
    DIR/checkpoints/latest             name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, and ``latest`` is
replaced atomically afterwards, so a crash (or a full disk) while saving leaves the previous one
whole. A checkpoint folder holding any other file (a pickled ``state.pt``, say) is refused by
every command: loading a pickle can run arbitrary code. The one pickle m3i lets torch read,
the ``.metadata`` index of a sharded optimizer state (FSDP runs), is first checked opcode by
opcode, without running it: it may name only the index's own types.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..weights import shared_mode
from .exports import refuse_export

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)
SHARDED_DIR = "optimizer"
_NAME = re.compile(r"step_\d{6,}")


class UnsafeCheckpointError(ValueError):
    """A checkpoint folder that holds something m3i does not load (the message names it)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one is whole (the message says where)."""


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


# ---------------------------------------------------------------------------------------------
# the training state as JSON + tensors


def to_json(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A nest of dicts, lists, tuples, scalars, strings, tensors and numpy arrays -> JSON values;
    tensors (and arrays) are moved into ``tensors`` and replaced by ``{"$tensor": key}``."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": to_json(torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj), tensors),
                "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"$tuple": [to_json(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [to_json(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: to_json(v, tensors) for k, v in obj.items()}
        return {"$items": [[to_json(k, tensors), to_json(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"the training state holds a {type(obj).__name__}, which a checkpoint does not store")


def from_json(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """Inverse of :func:`to_json`; anything it would not have written is refused."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [from_json(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        raise UnsafeCheckpointError(f"{where}: unexpected JSON value {type(obj).__name__}")
    marks = [k for k in obj if k.startswith("$")]
    if not marks:
        return {k: from_json(v, tensors, where) for k, v in obj.items()}
    mark = marks[0]
    if mark == "$tensor" and isinstance(obj[mark], str) and obj[mark] in tensors:
        return tensors[obj[mark]]
    if mark == "$ndarray" and isinstance(obj.get("dtype"), str):
        t = from_json(obj[mark], tensors, where)
        if isinstance(t, torch.Tensor) and obj["dtype"] in ("uint32", "int64", "float64", "float32", "uint8"):
            return t.numpy().astype(obj["dtype"])
    if mark == "$tuple" and isinstance(obj[mark], list):
        return tuple(from_json(v, tensors, where) for v in obj[mark])
    if mark == "$items" and isinstance(obj[mark], list) and all(isinstance(p, list) and len(p) == 2 for p in obj[mark]):
        return {from_json(k, tensors, where): from_json(v, tensors, where) for k, v in obj[mark]}
    raise UnsafeCheckpointError(f"{where}: unexpected entry {json.dumps(obj)[:80]}; not written by m3i")


# ---------------------------------------------------------------------------------------------
# saving


def save(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep: int = 2,
         extra: dict[str, Path] | None = None) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints. ``extra``:
    folders already written (a sharded optimizer state) moved into the checkpoint under these names.

    An ``OSError`` while writing (a full disk, say) removes the partial folder and raises
    :class:`CheckpointWriteError`; ``latest`` still names the previous checkpoint, which is whole.
    """
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / MODEL_FILE),
                  metadata={"format": "pt", "step": str(step)})
        tensors: dict[str, torch.Tensor] = {}
        doc = to_json(state, tensors)
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt", "step": str(step)})
        for f in (MODEL_FILE, OPTIMIZER_FILE):
            shared_mode(tmp / f)
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(doc, f)
        for sub, folder in (extra or {}).items():
            os.replace(folder, tmp / sub)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root / "latest")
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(e, "strerror", None) or str(e)
        try:
            prev = f"the previous checkpoint {find(run_dir)} is whole"
        except (FileNotFoundError, ValueError):
            prev = "there is no earlier checkpoint"
        raise CheckpointWriteError(
            f"{final}: the checkpoint could not be written ({why}); {prev}. Free some space (or fix the "
            f"folder's permissions), then continue with `m3i pretrain --resume {run_dir}`") from None
    # the newest ``keep`` of the run's own line: the checkpoints before this one (any of a later
    # step is not this line's, and is left alone)
    line = sorted((p for p in root.glob("step_*") if _NAME.fullmatch(p.name) and p.is_dir() and step_of(p) < step),
                  key=step_of)
    for old in line[:len(line) - (keep - 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def step_of(checkpoint: Path) -> int:
    """The step of a checkpoint folder, from its name (step_000200 -> 200)."""
    return int(checkpoint.name.removeprefix("step_"))


# ---------------------------------------------------------------------------------------------
# loading


def verify(ckpt: Path) -> Path:
    """Refuse a checkpoint folder holding anything but the files m3i writes (before any is read)."""
    for entry in sorted(ckpt.iterdir()):
        if entry.name == SHARDED_DIR and entry.is_dir():
            _verify_sharded(entry)
            continue
        if entry.name not in CHECKPOINT_FILES:
            raise UnsafeCheckpointError(
                f"{entry}: refused: not part of an m3i checkpoint, which holds only {', '.join(CHECKPOINT_FILES)} "
                f"(m3i never unpickles files, as that can run arbitrary code); remove it if you trust the rest")
    return ckpt


def _verify_sharded(folder: Path) -> None:
    """A sharded optimizer state holds only ``*.distcp`` shards (torch reads them with
    ``weights_only=True``) and a ``.metadata`` index (see :func:`_check_sharded_index`)."""
    for entry in sorted(folder.iterdir()):
        if not (entry.is_file() and (entry.name == ".metadata" or entry.name.endswith(".distcp"))):
            raise UnsafeCheckpointError(f"{entry}: refused: not part of a sharded optimizer state (*.distcp, .metadata)")


# what a torch.distributed.checkpoint index may name: its own dataclasses, sizes, dtypes, paths
_INDEX_GLOBALS = {f"torch.distributed.checkpoint.metadata.{n}" for n in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
    "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")} | {
    "torch.distributed.checkpoint.filesystem._StorageInfo", "torch.Size", "torch.serialization._get_layout",
    "pathlib.PosixPath", "pathlib.WindowsPath"}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def _index_global(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    return name in _INDEX_GLOBALS or (module == "torch" and isinstance(getattr(torch, attr, None), torch.dtype))


def _check_sharded_index(index: Path) -> None:
    """torch.distributed.checkpoint unpickles its ``.metadata`` index as it is. Before it does,
    every callable the pickle names is read off its opcodes (nothing is executed) and must be
    one of the index's own types; anything else is refused."""
    import pickletools

    def refuse(why: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{index}: refused: {why}; a sharded optimizer state's index names only "
                                     f"its own types (m3i never unpickles anything else)")

    pushed: list = []  # the values of recent pushes (strings, else None)
    memo: dict[int, object] = {}
    try:
        for op, arg, _ in pickletools.genops(index.read_bytes()):
            name = op.name
            if name in ("FRAME", "PROTO", "STOP"):
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = pushed[-1] if pushed else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(int(arg)))
            elif name in _STRING_OPS:
                pushed.append(arg if isinstance(arg, str) else None)
            elif name in ("GLOBAL", "INST"):
                target = str(arg).replace(" ", ".")
                if not _index_global(target):
                    raise refuse(f"it names {target}")
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                module, attr = (pushed[-2:] if len(pushed) >= 2 else [None, None])
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise refuse("it builds a name to import")
                if not _index_global(f"{module}.{attr}"):
                    raise refuse(f"it names {module}.{attr}")
                pushed.append(None)
            elif name in ("EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"):
                raise refuse(f"it uses the {name} opcode")
            else:
                pushed.append(None)
            del pushed[:-2]
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # not a pickle at all
        raise refuse(f"not readable ({' '.join(str(e).split())[:120]})") from None


def as_folder(path: str | Path) -> Path:
    """Any path a user may give for a checkpoint -> the run or checkpoint folder it stands for: a
    file of a checkpoint (``model.safetensors``), the ``checkpoints/latest`` pointer and the
    ``checkpoints/`` folder name their checkpoint or run; anything else is returned as it is."""
    path = Path(path)
    if path.is_file() and path.name in CHECKPOINT_FILES:
        return path.parent
    if path.is_file() and path.name == "latest" and path.parent.name == "checkpoints":
        return path.parent.parent
    if path.is_dir() and path.name == "checkpoints" and not (path / MODEL_FILE).exists() and (
            (path / "latest").is_file() or any(_NAME.fullmatch(p.name) for p in path.iterdir())):
        return path.parent
    return path


def find(path: Path) -> Path:
    """A run directory or a checkpoint directory (or any path :func:`as_folder` takes) -> the
    checkpoint directory to load (verified)."""
    path = as_folder(path)
    refuse_export(path)  # an export is no checkpoint: say so, and what loads it
    if (path / MODEL_FILE).is_file():
        return verify(path)
    root = path / "checkpoints"
    latest = root / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if _NAME.fullmatch(name) and (root / name / MODEL_FILE).is_file():
            return verify(root / name)
    done = sorted((p for p in root.glob("step_*") if _NAME.fullmatch(p.name) and (p / MODEL_FILE).is_file()), key=step_of) \
        if root.is_dir() else []
    if done:  # ``latest`` lost or stale: the newest whole checkpoint
        return verify(done[-1])
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    raise FileNotFoundError(f"{path}: holds no checkpoint (expected {MODEL_FILE} or checkpoints/latest)")


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; an unreadable one is named in one line."""
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UnsafeCheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a run's latest (or the given) checkpoint; the training state is not read."""
    return read_tensors(find(path) / MODEL_FILE)


def load_state(path: Path) -> dict:
    """The training state (optimizer, scheduler, RNG, step) of a checkpoint, for ``--resume``."""
    ckpt = find(path)
    for name in (OPTIMIZER_FILE, STATE_FILE):
        if not (ckpt / name).is_file():
            raise FileNotFoundError(f"{ckpt / name}: missing; this checkpoint holds weights only and cannot be "
                                    f"resumed (start from its weights with --init-from)")
    tensors = read_tensors(ckpt / OPTIMIZER_FILE)
    if (ckpt / SHARDED_DIR / ".metadata").is_file():
        _check_sharded_index(ckpt / SHARDED_DIR / ".metadata")
    try:
        doc = json.loads((ckpt / STATE_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsafeCheckpointError(f"{ckpt / STATE_FILE}: not valid JSON ({e})") from None
    state = from_json(doc, tensors, str(ckpt / STATE_FILE))
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng"} <= set(state):
        raise UnsafeCheckpointError(f"{ckpt / STATE_FILE}: expected step, optimizer, scheduler and rng")
    return state


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and training state of a checkpoint."""
    return load_weights(path), load_state(path)
