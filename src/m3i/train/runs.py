"""A run directory, the one place that knows its layout::

    RUN/config.yaml          the resolved recipe the run trained with (data paths absolute)
    RUN/classes.json         its label space: every source's class names at its offset
    RUN/metrics.jsonl        one JSON object per logged step
    RUN/tensorboard/         the same, for TensorBoard
    RUN/checkpoints/step_N/  model.safetensors, optimizer.safetensors, state.json (see checkpoint.py)
    RUN/checkpoints/latest   the name of the newest whole checkpoint
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .. import plugins
from ..config import Recipe, load_recipe
from . import checkpoint as ckpt

CONFIG = "config.yaml"
CLASSES = "classes.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def run_dir(path: str | Path) -> Path:
    """A run directory, or a checkpoint directory inside one (any path ``checkpoint.as_folder``
    takes) -> the run directory."""
    path = ckpt.as_folder(path)
    if (path / CONFIG).is_file() or not (path / ckpt.MODEL_FILE).is_file():
        return path
    return path.parent.parent


def write_recipe(out: str | Path, recipe: Recipe) -> None:
    """The resolved recipe, with ``plugins`` listing every module outside m3i whose parts it uses."""
    Path(out).mkdir(parents=True, exist_ok=True)
    data = recipe.model_dump(mode="json") | {"plugins": plugins.used_by(recipe)}
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

    path = ckpt.find(Path(checkpoint))
    recipe = read_recipe(path)
    return Objective.from_checkpoint_state(recipe, ckpt.load_weights(path), str(path)).to(device).eval()
