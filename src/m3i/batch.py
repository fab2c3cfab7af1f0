"""What passes between the data, the objective and the trainer: a :class:`Batch` of samples, the
host's share of its step (:class:`Drawn`) and the objective's outputs (:class:`Losses`).

The mixture (:mod:`m3i.data.mixture`) makes a batch on the host, in a DataLoader worker (it is
pickled to the trainer's process and pinned there); the objective's view stage
(:class:`m3i.views.stage.ViewStage`) adds what it draws and copies it to the device; the terms
read it from the step's context; exact gradient accumulation cuts it into micro-batches. Nothing
here imports the rest of m3i.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace

import torch
import torch.utils._pytree as pytree
from torch import Tensor


def tree_map(tree, fn: Callable[[Tensor], Tensor]):
    """``fn`` applied to every tensor of a nested dict, list or :class:`Drawn`; the rest kept."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: tree_map(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [tree_map(v, fn) for v in tree]
    if isinstance(tree, Drawn):
        return Drawn(**{f.name: tree_map(getattr(tree, f.name), fn) for f in fields(tree)})
    return tree


def to_device(tree, device: torch.device):
    """The tensors of ``tree`` on ``device``: pinned first when it is a GPU, then copied without
    making the host wait (``non_blocking``)."""
    device = torch.device(device)

    def move(x: Tensor) -> Tensor:
        if device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()
        return x.to(device, non_blocking=True)

    return tree_map(tree, move)


@dataclass(eq=False)
class Drawn:
    """The host's share of a step, drawn on the CPU before it: every random parameter of the views
    and what each target makes of the batch's host data."""

    # one per view (the global views, then multi-crop's local crops): its crop boxes, flips and
    # colour factors (ViewAugment.draw); None: not drawn
    views: list[dict[str, Tensor]] | None = None
    visible: dict[int, Tensor] = field(default_factory=dict)  # per masked view: (B, N) bool, True = seen
    # per term: what its target made of the host data (Target.stage: a caption's tokens); None: not yet
    targets: dict[str, dict[str, Tensor]] | None = None


# the keys a batch had as a dict -> its fields
_FIELDS = {"image": "images", "crops": "crops", "label": "labels", "caption": "captions", "drawn": "drawn",
           "source": "source", "index": "index", "step": "step", "n_skipped": "n_skipped",
           "n_replaced": "n_replaced", "n_retries": "n_retries"}


@dataclass(eq=False)
class Batch:
    """B samples of a step: their images (or, where the loader made the views, each view's crops),
    labels and captions, where they were drawn from, and what the host drew for the step."""

    labels: Tensor                       # long (B,), in the mixture's global label space; -1: none
    captions: list[str | None]
    images: Tensor | None = None         # uint8 (B, 3, S, S), RGB: the views are made on the device
    crops: list[Tensor] | None = None    # the loader made the views: each view's uint8 (B, 3, Sh, Sw), local crops smaller
    drawn: Drawn | None = None           # the views' parameters and masks; the targets' share once staged
    source: Tensor | None = None         # long (B,): the source of each slot
    index: Tensor | None = None          # long (B,): the sample's index in its source
    step: int | None = None
    n_skipped: int = 0                   # unreadable samples met, each replaced
    n_replaced: int = 0                  # slots whose planned sample was replaced
    n_retries: int = 0                   # reads tried again

    @classmethod
    def of(cls, batch: Batch | Mapping) -> Batch:
        """``batch`` itself, or the batch a dict with a batch's former keys (``image``, ``label``,
        ``caption``, ``crops``, ``drawn``, ...) holds; no label or caption: none on any sample."""
        if isinstance(batch, Batch):
            return batch
        unknown = sorted(set(batch) - set(_FIELDS))
        if unknown:
            raise KeyError(f"a batch has no {', '.join(map(repr, unknown))}; its keys are {', '.join(_FIELDS)}")
        kw = {_FIELDS[k]: v for k, v in batch.items()}
        if isinstance(kw.get("drawn"), Mapping):
            kw["drawn"] = Drawn(**kw["drawn"])
        n = len(kw["images"] if kw.get("images") is not None else kw["crops"][0])
        kw.setdefault("labels", torch.full((n,), -1, dtype=torch.long))
        kw.setdefault("captions", [None] * n)
        return cls(**kw)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return (self.images if self.images is not None else self.crops[0]).device

    @property
    def staged(self) -> bool:
        """Whether the view stage made its share (the targets' at least)."""
        return self.drawn is not None and self.drawn.targets is not None

    def to(self, device: torch.device) -> Batch:
        """What the step reads (images or crops, labels, the drawn share) on ``device``, copied
        pinned and ``non_blocking``."""
        return replace(self, **{k: to_device(getattr(self, k), device) for k in ("images", "crops", "labels", "drawn")})

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (what a DataLoader with ``pin_memory`` calls)."""
        return replace(self, **{f.name: tree_map(getattr(self, f.name), Tensor.pin_memory) for f in fields(self)})

    def __getitem__(self, key: str):
        """The field a batch's former dict key names (``batch["label"]`` is ``batch.labels``)."""
        return getattr(self, _FIELDS[key])

    def get(self, key: str, default=None):
        value = getattr(self, _FIELDS[key]) if key in _FIELDS else None
        return default if value is None else value

    __iter__ = None  # a batch is no sequence of its keys


@dataclass(eq=False)
class Losses:
    """The objective's outputs on a batch: the weighted total ``loss``, each term's value
    (``terms``) and the samples that carried each term's target (``samples``: a number, or a
    device tensor, read when the step is logged)."""

    loss: Tensor
    terms: dict[str, Tensor]
    samples: dict[str, Tensor | int]

    __iter__ = None  # no sequence of their keys

    def _place(self, key: str) -> tuple[dict, str]:
        if key in self.terms:
            return self.terms, key
        if isinstance(key, str) and key.startswith("n_") and key[2:] in self.samples:
            return self.samples, key[2:]
        raise KeyError(key)

    def __getitem__(self, key: str):
        """The outputs by their former dict keys: ``"loss"``, a term's name, ``"n_<term>"``."""
        if key == "loss":
            return self.loss
        where, name = self._place(key)
        return where[name]

    def items(self) -> list[tuple[str, Tensor | int]]:
        """The outputs as ``(former dict key, value)`` pairs: each term and its ``n_<term>``, then ``"loss"``."""
        return [p for t in self.terms for p in ((t, self.terms[t]), (f"n_{t}", self.samples[t]))] + [("loss", self.loss)]

    def __setitem__(self, key: str, value) -> None:
        if key == "loss":
            self.loss = value
        else:
            where, name = self._place(key)
            where[name] = value


# a module's outputs are walked as a tree by DDP and FSDP (to hook the backward on their tensors)
pytree.register_dataclass(Losses)

__all__ = ["Batch", "Drawn", "Losses", "to_device", "tree_map"]
