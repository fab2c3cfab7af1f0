"""Exact gradient accumulation (``train.accum_steps=K``): the gradient of a batch of B from K
micro-batches of B/K.

A mean of per-sample losses accumulates by adding the micro-batches' gradients. A Boltzmann term
over the batch (CLIP, SimCLR, MoCo v3) does not, nor does UniGrad, whose correlation spans every
target token: each sample's loss reads every other sample. So, as open_clip's ``--accum-freq``
does, a pass without gradient runs every micro-batch through the objective and keeps each term's
predictions and targets (:class:`~m3i.targets.base.Embedding`) and the target encoders' features;
then each micro-batch runs again with gradient, and the loss of the whole batch is computed from
its own fresh rows put in their place among the others' kept ones. Its gradient is the whole
batch's gradient through that micro-batch; summed over the K micro-batches, the whole batch's
gradient. What keeps the sum exact:

- each micro-step also reads the terms' own parameters (temperatures, class tables) whole, so K
  micro-steps would count their gradient K times: they enter as ``x.detach() + (x − x.detach())/K``,
  the same value with 1/K of the gradient (:meth:`MicroBatches.share`);
- the pass with gradient replays the random state the pass without it ran each micro-batch with
  (stochastic depth and dropout draw the same), and reuses the target encoders' features (EMA teacher,
  frozen models: no gradient, so nothing to run again);
- the views are made once for the whole batch from the parameters :meth:`Objective.stage` drew
  on the host, then cut: every view, the global ones, their masks and multi-crop's local crops
  alike, however many; the mixed input's pairs (sample b with b + B/2) stay in one micro-batch.

Every cut is a slice of fixed shape: nothing is read back to the host. What cannot be equal: a
batch norm in training (a ResNet backbone, the BYOL / MoCo v3 / SimCLR / m3i projectors)
normalises each micro-batch by its own statistics and moves its running statistics once per
micro-batch, and stochastic depth (a trainable MiniLM tower's dropout too) draws per
micro-batch, not per batch. The EMA teacher and the
optimiser step once per step, after the last micro-batch, as without accumulation.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..batch import Batch, Drawn
from ..config import check_accum_steps
from ..layers import running_stats
from ..terms import Embedding, Embeddings, Views

if TYPE_CHECKING:
    from ..objective import Objective

Rows = tuple[slice, ...]  # one micro-batch: a slice of the batch, or one of each half (the mixed input)


def micro_rows(batch: int, k: int, paired: bool) -> list[Rows]:
    """The rows of each of ``k`` micro-batches of a batch of ``batch``, as slices. ``paired`` (the
    mixed input): sample b and b + B/2 share a canvas, so the j-th micro-batch takes the j-th slice
    of each half, and its own first half is again the first image of each canvas."""
    check_accum_steps(k, batch, 1, paired)
    per = batch // 2 if paired else batch
    m = per // k
    return [(slice(j * m, (j + 1) * m),) + ((slice(per + j * m, per + (j + 1) * m),) if paired else ())
            for j in range(k)]


def take(x, rows: Rows):
    """The rows ``rows`` of a tensor or a list of one entry per sample."""
    if isinstance(x, Tensor):
        return x[rows[0]] if len(rows) == 1 else torch.cat([x[r] for r in rows])
    return [v for r in rows for v in x[r]]


def take_tree(tree, rows: Rows, n: int):
    """Every per-sample entry (a tensor of ``n`` rows, a list of ``n`` entries) of a nested dict
    cut to ``rows``; anything else kept as it is."""
    if isinstance(tree, dict):
        return {k: take_tree(v, rows, n) for k, v in tree.items()}
    if isinstance(tree, Tensor) and tree.dim() and tree.shape[0] == n or isinstance(tree, list) and len(tree) == n:
        return take(tree, rows)
    return tree


def take_batch(batch: Batch, rows: Rows, n: int) -> Batch:
    """The micro-batch ``rows`` of a staged batch of ``n``: its samples and its targets' host
    inputs (its views are cut apart, :func:`take_views`)."""
    cut = {k: take_tree(getattr(batch, k), rows, n) for k in ("images", "labels", "captions", "source", "index")}
    return replace(batch, **cut, crops=None, drawn=Drawn(targets=take_tree(batch.drawn.targets, rows, n)))


def take_views(views: Views, rows: Rows) -> Views:
    """The micro-batch ``rows`` of every view (global views and local crops), its boxes, flips and masks."""
    return Views([take(x, rows) for x in views.images], [take(x, rows) for x in views.boxes],
                 [take(x, rows) for x in views.flips], {v: take(m, rows) for v, m in views.visible.items()},
                 views.count)


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class MicroBatches:
    """A batch as ``k`` micro-batches, run once without gradient.

    ``batch`` as :meth:`Objective.stage` made it (a batch not staged is staged here); ``views``:
    its views when already made. Iterating yields each micro-batch ``(batch, views)``; while it is
    current, ``objective(batch, views, cache=this)`` (or the DDP module around it) returns the
    loss of the whole batch, with gradient through this micro-batch.
    """

    def __init__(self, objective: Objective, batch: Batch | Mapping, k: int, views: Views | None = None):
        for term in objective.terms:
            if term.target.in_one_call():
                raise ValueError(f"train.accum_steps: the {term.target.kind!r} target of term {term.name!r} computes "
                                 f"its loss in one call (its own Target.loss); micro-batches need its embed and "
                                 f"score, with loss left as embed then score")
        batch = Batch.of(batch)
        if not batch.staged:
            batch = objective.stage(batch, batch.device, views=views is None)
        if views is None:
            views = objective.views_of(batch)
        n = views.images[0].shape[0]
        device = views.images[0].device
        if any(v not in views.visible for v in objective.masked_views()):
            # views made elsewhere without masks: drawn once, for the whole batch
            drawn = {v: m.to(device) for v, m in objective.view_stage.draw_visible(n).items()}
            count = views.count if views.visible else objective.view_stage.visible_count()
            views = Views(views.images, views.boxes, views.flips, {**drawn, **views.visible}, count)
        self.k, self.slot, self.device = k, None, device
        self.parts = [(take_batch(batch, rows, n), take_views(views, rows))
                      for rows in micro_rows(n, k, objective.recipe.views.input_mode == "mix")]
        self.embeddings: list[Embeddings] = []
        self.features: list[dict] = []
        self.rng: list[tuple] = []
        stats = running_stats(objective)
        kept = [b.clone() for b in stats]
        self.filling = True
        with torch.no_grad():  # through the module's own call: FSDP gathers the objective's parameters
            for part, part_views in self.parts:
                self.rng.append(_rng_state(device))
                objective(part, part_views, cache=self)
        self.filling = False
        for b, v in zip(stats, kept):  # the pass with gradient moves them, once per micro-batch
            b.copy_(v)
        self.rng_after = _rng_state(device)

    def __len__(self) -> int:
        return self.k

    def __iter__(self):
        for j, part in enumerate(self.parts):
            self.slot = j
            _set_rng_state(self.rng[j], self.device)
            yield part
        self.slot = None
        _set_rng_state(self.rng_after, self.device)  # the run's random stream continues where the first pass left it

    def keep(self, embeddings: Embeddings, features: dict) -> None:
        """The pass without gradient: one micro-batch's embeddings and target-encoder features."""
        self.embeddings.append(embeddings)
        self.features.append(features)

    @property
    def target_cache(self) -> dict | None:
        """The target encoders' features of the current micro-batch (None while they are computed)."""
        return None if self.filling else self.features[self.slot]

    def splice(self, fresh: Embeddings) -> Embeddings:
        """The whole batch's embeddings: the current micro-batch's ``fresh`` ones (with gradient)
        in its place among the kept ones."""
        out = {}
        for key, emb in fresh.items():
            parts = [e[key] for e in self.embeddings]
            parts[self.slot] = emb
            out[key] = Embedding.cat(parts)
        return out

    def share(self, x: Tensor) -> Tensor:
        """``x`` (read off a term's parameters in each micro-step) with 1/K of its gradient."""
        return x.detach() + (x - x.detach()) / self.k
