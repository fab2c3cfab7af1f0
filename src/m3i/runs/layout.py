"""A run directory, the one place that knows its layout::

    RUN/config.yaml          the resolved recipe the run trained with (data paths absolute)
    RUN/classes.json         its label space: every source's class names at its offset
    RUN/metrics.jsonl        one JSON object per logged step
    RUN/tensorboard/         the same, for TensorBoard
    RUN/checkpoints/step_N/  model.safetensors, optimizer.safetensors, state.json (see checkpoint.py)
    RUN/checkpoints/latest   the name of the newest whole checkpoint

A folder that holds a run is never written over by accident: a new run into it is refused
(:func:`claim`) unless told to move the old one aside, and a run continues only from its newest
checkpoint; from an older one, or fine-tuned, it is a new run in a folder of its own (a branch).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from .. import plugins
from ..config import ConfigError, Recipe, load_recipe, plugins_used_by, upgrade_saved, validate
from .checkpoint import MODEL_FILE, STATE_FILE, as_folder, find, load_weights, step_of
from .lock import held_by, locked

CONFIG = "config.yaml"
CLASSES = "classes.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
RUN_ENTRIES = (CONFIG, METRICS, TENSORBOARD, "checkpoints")  # any of them: the folder holds a run


def run_dir(path: str | Path) -> Path:
    """A run directory, or a checkpoint directory inside one (any path ``checkpoint.as_folder``
    takes) -> the run directory."""
    path = as_folder(path)
    if (path / CONFIG).is_file() or not (path / MODEL_FILE).is_file():
        return path
    return path.parent.parent


def write_recipe(out: str | Path, recipe: Recipe) -> None:
    """The resolved recipe, with ``plugins`` listing every module outside m3i whose parts it uses."""
    Path(out).mkdir(parents=True, exist_ok=True)
    data = recipe.model_dump(mode="json") | {"plugins": plugins_used_by(recipe)}
    (Path(out) / CONFIG).write_text(yaml.safe_dump(data, sort_keys=False))


def read_recipe(path: str | Path, config: str | None = None, overrides: list[str] = ()) -> Recipe:
    """The recipe a run (or a checkpoint of it) trained with, with optional changes on top."""
    run = run_dir(path)
    if not (run / CONFIG).is_file():
        raise FileNotFoundError(f"{run}: no {CONFIG}; is it an m3i run directory?")
    return load_recipe(str(run / CONFIG), config, overrides, saved=True)


def load_run(checkpoint: str | Path, device: str = "cpu"):
    """Rebuild a run's objective from its saved config and its latest (or the given) checkpoint's
    weights, in eval mode; the training state is never read."""
    from ..objective import Objective

    path = find(Path(checkpoint))
    recipe = read_recipe(path)
    return Objective.from_checkpoint_state(recipe, load_weights(path), str(path)).to(device).eval()


# ---------------------------------------------------------------------------------------------
# what a folder holds, and who may write into it


def newest(run: str | Path) -> Path | None:
    """The run's newest whole checkpoint (what ``latest`` names), or None."""
    try:
        return find(Path(run))
    except (FileNotFoundError, ValueError):
        return None


def _progress(path: Path) -> tuple[str | None, Path | None, int | None]:
    """A run folder's recipe name, newest checkpoint and the steps it asks for (None: unknown)."""
    try:
        config = yaml.safe_load((path / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        config = None
    config = config if isinstance(config, dict) else {}
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    total = train.get("steps")
    return config.get("name"), newest(path), total if isinstance(total, int) else None


def describe(path: str | Path) -> str | None:
    """What ``path`` holds, in a few words ("a run of recipe 'm3i' at step 600 of 1800, not
    finished"), or None when it holds no run (absent, empty, or files that are no run's)."""
    path = Path(path)
    if not path.is_dir() or not any((path / e).exists() for e in RUN_ENTRIES):
        return None
    name, last, total = _progress(path)
    what = f"a run of recipe {name!r}" if name else "a run"
    if last is None:
        return f"{what} with no checkpoint yet"
    step = step_of(last)
    if _is_finetune(last):
        return f"a fine-tuning run ({step} steps)"
    if total is None:
        return f"{what} at step {step}"
    return f"{what} at step {step} of {total}, {'finished' if step >= total else 'not finished'}"


def finished(path: str | Path, steps: int | None = None) -> bool:
    """Whether the run's newest checkpoint reached ``steps`` (default: the steps its config asks for)."""
    _, last, total = _progress(Path(path))
    total = steps or total
    return last is not None and total is not None and step_of(last) >= total


def _is_finetune(checkpoint: Path) -> bool:
    try:
        return "finetune" in json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False


def claim(out: str | Path, overwrite: bool = False, flag: str = "--out", choices: str | None = None,
          held: str | None = "run") -> None:
    """Make ``out`` a place a new run (or an export) may write into, or raise a one-line
    ValueError. ``held``: what is there ("run": whatever :func:`describe` says); it is refused,
    unless ``overwrite``: then it is moved aside to ``OUT.old-<time>`` (never deleted), said on
    stdout. ``choices``: what the refusal offers instead (default: those of a run folder)."""
    out = Path(out)
    if out.is_dir() and (pid := held_by(out)) is not None:  # a live run: not to be moved aside either
        raise locked(out, pid)
    if held == "run":
        if out.is_file():
            raise ValueError(f"{flag} {out}: is a file, not a run folder; choose another {flag}")
        held = describe(out)
    if held is None:
        return
    if not overwrite:
        if choices is None:  # a run without a checkpoint cannot be continued
            resume = f"continue it with --resume {out}{' --steps N' if finished(out) else ''}, " if newest(out) else ""
            choices = f"{resume}choose another {flag}"
        raise ValueError(f"{flag} {out}: holds {held}; {choices}, or pass --overwrite to move it aside "
                         f"(to {out}.old-<time>)")
    aside = move_aside(out)
    print(f"{flag} {out}: held {held}; moved it aside to {aside}")


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``PATH.old-<local time>`` (a free name) and return that."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = path.with_name(f"{path.name}.old-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.old-{stamp}-{n}")
    os.replace(path, aside)
    return aside


def same_or_inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or inside it (paths resolved)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents


def branch_folder(run: Path, checkpoint: Path) -> Path:
    """The folder to suggest for a run branched off ``run`` at ``checkpoint``."""
    return run.with_name(f"{run.name}-from-{checkpoint.name}")


def resume_into(resume: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """Check that ``--resume RESUME --out OUT`` rewinds or rewrites nothing of the run it resumes:
    into the run itself only from its newest checkpoint (a continuation); from an older one it is
    a branch, a new run, which needs a folder of its own (claimed as any new run's)."""
    source, out = run_dir(resume), Path(out)
    start, last = find(Path(resume)), newest(source)
    branch = branch_folder(source, start)
    if out.resolve() == source.resolve():
        if overwrite:
            raise ValueError(f"--overwrite: {out} is the run --resume continues; drop --overwrite, or give a "
                             f"branch of it another --out (e.g. --out {branch})")
        if last is not None and step_of(start) < step_of(last):
            raise ValueError(f"--resume {resume}: step {step_of(start)} is older than the run's newest checkpoint "
                             f"({last.name}); resuming it there would rewind {source}. A branch is a new run: give "
                             f"it a folder of its own, e.g. --out {branch}")
        return  # a continuation
    if same_or_inside(out, source) or same_or_inside(source, out):
        raise ValueError(f"--out {out}: {'inside' if same_or_inside(out, source) else 'holds'} the run it resumes "
                         f"({source}); give the new run a folder of its own, e.g. --out {branch}")
    claim(out, overwrite)


# ---------------------------------------------------------------------------------------------
# what a resume changes


def _flat(value, key: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for name, sub in value.items() for k, v in _flat(sub, f"{key}.{name}" if key else name).items()}
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return {k: v for i, sub in enumerate(value) for k, v in _flat(sub, f"{key}.{i}").items()}
    return {key: value}


CONTINUATION = {"train.steps"}  # settings whose change continues the same run


def changes(saved: dict, now: Recipe, step: int) -> list[str]:
    """The notes for resuming a run saved with recipe ``saved`` (its checkpoint's) with ``now``:
    one line per changed setting (a part added or removed is one setting), and one that says the
    run is then no longer the uninterrupted one; none when only the step count changed (a
    continuation)."""
    try:
        saved = validate(upgrade_saved(saved), "the checkpoint's recipe").model_dump(mode="json")
    except ConfigError:
        pass  # compared as saved
    trees = {"before": saved, "after": now.model_dump(mode="json")}
    flat = {side: _flat(tree) for side, tree in trees.items()}

    def shown(side: str, key: str) -> str:
        value = trees[side]
        for part in key.split("."):
            if isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            elif isinstance(value, dict) and part in value:
                value = value[part]
            else:
                return "(unset)"
        return json.dumps(value)

    def setting(key: str) -> str:  # where a part is only on one side: the part, as one setting
        parts = key.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if any(not any(k.startswith(prefix + ".") for k in keys) for keys in flat.values()):
                return prefix
        return key

    keys = dict.fromkeys(setting(k) for k in sorted(flat["before"].keys() | flat["after"].keys()))
    lines = [f"note: resuming with {key}={shown('after', key)} (the run so far: {shown('before', key)})"
             for key in keys if key not in CONTINUATION and shown("before", key) != shown("after", key)]
    if lines:
        lines.append(f"note: from step {step} on, the run trains with these changes: it is no longer the "
                     f"uninterrupted run")
    return lines
