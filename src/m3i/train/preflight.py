"""What a pre-training run checks before it builds its model: every term's target against the
data it will see, and the memory its batch needs; and how it states its settings (relative data
paths made absolute, image sizes that differ, the class names of its label space)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import memory
from ..config import Recipe
from ..data import Mixture
from ..data.spec import absolute_spec
from ..targets import TARGETS
from .. import runs


def check_targets(recipe: Recipe, sources) -> None:
    """Refuse a term whose target no source carries (CLIP on images without captions), naming it."""
    for i, t in enumerate(recipe.terms):
        try:
            TARGETS[t.target.kind].check_data(t, sources)
        except ValueError as e:
            raise ValueError(f"terms.{i} ({t.name!r}): {e}") from None


def check_memory(recipe: Recipe, device: torch.device, world: int) -> None:
    """Refuse image sizes whose batch and views alone exceed the device's memory (a floor: the
    model's activations come on top). Every view counts, multi-crop's local crops at their size."""
    d, v = recipe.data, recipe.views
    rows = d.batch_size // world
    pixels = sum(v.size_of(k, recipe.backbone.img_size) ** 2 for k in range(v.total))
    need = rows * 3 * (d.image_size ** 2 + 4 * pixels)  # uint8 batch + float views
    local = f" + {v.local.count} local crop(s) at {v.local.size} px" if v.local else ""
    memory.require(need, device, f"data.image_size={d.image_size}, backbone.img_size={recipe.backbone.img_size}: "
                                 f"a batch of {rows} images and its {v.count} view(s){local}")


def size_note(recipe: Recipe) -> str | None:
    d, b = recipe.data.image_size, recipe.backbone.img_size
    if d == b:
        return None
    return f"note: images are read at data.image_size={d} and their views resized to backbone.img_size={b}"


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with its sources' relative paths made absolute (from the working directory): what
    the run reads and what its config.yaml keeps, so that --resume from any folder reads the same files."""
    sources = [s.model_copy(update={"spec": absolute_spec(s.spec)}) for s in recipe.data.sources]
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"sources": sources})})


def write_classes(out: Path, recipe: Recipe, mixture: Mixture) -> None:
    """RUN/classes.json: the run's label space, the class names of every source at its offset."""
    rows = [{"spec": s.spec, "offset": mixture.class_offsets[k], "classes": list(mixture.sources[k].class_names)}
            for k, s in enumerate(recipe.data.sources)]
    (out / runs.CLASSES).write_text(json.dumps({"classes": mixture.class_names, "sources": rows}, indent=1) + "\n")
