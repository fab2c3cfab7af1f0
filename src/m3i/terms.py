"""All that a part sees of the objective: a term, the views of a batch, the step's shared context
and the rows a term hands its estimator.

A target kind computes its term from two things, both defined here:

- the :class:`Term`: its settings (``cfg``), its decoder (``decoder``, and ``predictor`` for the
  global decoder), the modules its target kind built (the class table ``classes``, the text tower
  ``text`` and its projection ``text_proj``), its estimator and temperature;
- the :class:`Context` of the step: the batch, the views, the online encoder's features of each
  view (``online``), the masks (``visible``), and the features and copied head of the term's
  copied target encoder (``target_features``, ``target_head``). Each is computed once per step on
  first use and shared by every term that reads it.

It does so in two halves: the rows' predictions and targets (an :class:`Embedding`), then the
estimator over them; gradient accumulation keeps the rows of micro-batches in between
(:class:`EmbeddingCache`).

Nothing here imports a target kind or the objective: the objective builds terms from the
registries and hands each the context.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from .backbones import Backbone, Features
from .batch import Batch
from .encoders.copies import CopiedEncoder
from .views.masks import draw_visible, visible_count
from .views.stage import Views, grid_of


@dataclass
class Embedding:
    """One batch's predictions ẑ and targets z of a term, row by row, before the estimator scores
    them: what gradient accumulation keeps of the micro-batches not being re-run (:mod:`m3i.train.accumulation`)."""

    pred: Tensor                  # (R, D)
    target: Tensor                # (R, D); a label target's (R,) class of each row
    avail: Tensor | None = None   # (R,) bool: the rows that carry a target (None: every row)
    samples: int | Tensor = 0     # the samples that carried the target (a number, or a device tensor)

    @staticmethod
    def cat(parts: list[Embedding]) -> Embedding:
        """The embedding of the batch made of these batches, their rows in this order."""
        avail = None if parts[0].avail is None else torch.cat([p.avail for p in parts])
        return Embedding(torch.cat([p.pred for p in parts]), torch.cat([p.target for p in parts]), avail,
                         sum((p.samples for p in parts[1:]), parts[0].samples))


@dataclass
class Scored:
    """A term's loss as a target kind that computes it in one call (its own ``Target.loss``) gives
    it: already scored, so it trains in one pass only."""

    loss: Tensor
    samples: int | Tensor


def whole(x: Tensor) -> Tensor:
    """What :meth:`Target.score` applies to what it reads off the term's own parameters (class
    table, temperature): the tensor itself, unless gradient accumulation shares out its gradient."""
    return x


Embeddings = dict[tuple[str, int], Embedding | Scored]  # (term, direction) -> its rows


class EmbeddingCache(Protocol):
    """What the objective's forward pass reads of gradient accumulation's cache of a batch's micro-batches
    (``m3i.train.accumulation.MicroBatches``): while ``filling``, it keeps every micro-batch's
    embeddings; then it splices the current micro-batch's, with gradient, among the kept ones."""

    filling: bool

    @property
    def target_cache(self) -> dict | None: ...

    def keep(self, embeddings: Embeddings, features: dict) -> None: ...

    def splice(self, fresh: Embeddings) -> Embeddings: ...

    def share(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Pair:
    """The views of a mixed canvas's two images: the first image of each canvas (rows ``< B/2``)
    takes view ``first``, its partner view ``second`` (the paper's assignment: one image predicts
    its own view, the other a different augmented view)."""

    first: int
    second: int


class Context:
    """Everything the terms of one step share, each piece computed once on first use.

    Multi-crop's local crops (``views.local``, the views after the global ones) share one size:
    the first :meth:`online` read of any of them runs them all, unmasked, as one batch through the
    backbone (their concatenation along the batch, no padding, no loop over crops), and keeps
    each crop's share; a local crop has its own, smaller patch grid (:meth:`grid_of`).

    ``backbone``: the online encoder; ``views_cfg``: the recipe's views (mask kind and ratio, input
    mode); ``copies``: term name -> its copied target encoder (the shared EMA teacher or the term's
    frozen model); ``teacher_layers``: how many block outputs the copies return (data2vec's top-K);
    ``target_cache``: the copies' features of this very batch already computed (a micro-batch run
    again with gradient), filled as they are computed.
    """

    def __init__(self, batch: Batch, views: Views, backbone: Backbone, views_cfg,
                 copies: Mapping[str, CopiedEncoder] | None = None, teacher_layers: int = 0,
                 target_cache: dict | None = None):
        self.batch, self.views = batch, views
        self._backbone, self._views_cfg = backbone, views_cfg
        self._copies = dict(copies or {})
        self._teacher_layers = teacher_layers
        self.batch_size = views.images[0].shape[0]
        self.grid_size: tuple[int, int] = backbone.grid_size
        self.patch_size: int = backbone.patch_size
        self._visible: dict[int, Tensor] = dict(views.visible)
        self._online: dict[tuple[int, bool], Features] = {}
        # (id of the copy, view) -> its features
        self.target_cache: dict[tuple[int, int | Pair], Features] = {} if target_cache is None else target_cache

    def grid_of(self, view: int | Pair) -> tuple[int, int]:
        """The patch grid ``(gh, gw)`` of ``view``: ``grid_size`` for a global view, a local crop's
        own (``views.local.size // patch_size`` across)."""
        return grid_of(self._views_cfg, view, self.grid_size, self.patch_size)

    def visible(self, view: int) -> Tensor:
        """(B, N) bool: the patches of ``view`` the online encoder sees."""
        if view not in self._visible:  # not drawn with the batch (a direct call): drawn now, on the host
            mask = draw_visible(self._views_cfg, self.batch_size, self.grid_of(view))
            self._visible[view] = mask.to(self.views.images[view].device)
        return self._visible[view]

    def visible_count(self, view: int) -> int | None:
        """Patches visible per row of ``visible(view)`` (None: only the mask's values tell); the
        grid's every patch where the rows differ (``views.mask.ratio: [lo, hi]``, ``probability``):
        the ``fill`` input then keeps every token, in patch order."""
        if view in self.views.visible:
            return self.views.count
        gh, gw = self.grid_of(view)
        return visible_count(self._views_cfg, gh * gw)

    def online(self, view: int, masked: bool) -> Features:
        """The online encoder's features of ``view``, of its visible patches when ``masked``."""
        key = (view, masked)
        if key not in self._online:
            x = self.views.images[view]
            if masked:
                self._online[key] = self._backbone.forward_features(
                    x, self.visible(view), mode=self._views_cfg.input_mode, count=self.visible_count(view))
            elif view in self._views_cfg.local_views():
                self._online_local()
            else:
                self._online[key] = self._backbone.forward_features(x)
        return self._online[key]

    def _online_local(self) -> None:
        """Every local crop through the online encoder, unmasked, in one batch: their concatenation
        along the batch, its features split back into each crop's."""
        local = self._views_cfg.local_views()
        feats = self._backbone.forward_features(torch.cat([self.views.images[v] for v in local]))
        b = self.batch_size
        pooled, tokens = feats.pooled.split(b), feats.tokens.split(b)
        layers = [h.split(b) for h in feats.layers]
        for k, v in enumerate(local):
            self._online[(v, False)] = Features(pooled[k], tokens[k], [h[k] for h in layers])

    def view(self, view: int | Pair) -> tuple[Tensor, Tensor, Tensor]:
        """(images, boxes, flips) of a view, or of a :class:`Pair` of views in the mixed input."""
        v = self.views
        if isinstance(view, int):
            return v.images[view], v.boxes[view], v.flips[view]
        s, t = view.first, view.second
        first = torch.arange(self.batch_size, device=v.images[s].device) < self.batch_size // 2
        pick = lambda a, b: torch.where(first.view(-1, *[1] * (a.dim() - 1)), a, b)  # noqa: E731
        return pick(v.images[s], v.images[t]), pick(v.boxes[s], v.boxes[t]), pick(v.flips[s], v.flips[t])

    def _copy(self, term: Term) -> CopiedEncoder:
        if term.name not in self._copies:
            raise ValueError(f"terms.{term.name}.target_encoder: a {term.cfg.target_encoder.kind!r} encoder keeps no "
                             f"copy of the backbone")
        return self._copies[term.name]

    @torch.no_grad()
    def target_features(self, term: Term, view: int | Pair) -> Features:
        """Features of ``view`` from the term's copied target encoder (the EMA teacher, shared by
        every EMA term, or the term's frozen model), with ``teacher_layers`` block outputs."""
        net = self._copy(term)
        key = (id(net), view)
        if key not in self.target_cache:
            self.target_cache[key] = net.backbone.forward_features(self.view(view)[0],
                                                                   return_layers=self._teacher_layers)
        return self.target_cache[key]

    def target_head(self, term: Term) -> nn.Module:
        """The copied target encoder's copy of the term's head (``target_encoder.head: true``)."""
        return self._copy(term).heads[term.name]


class Term(nn.Module):
    """One mutual-information term I(g_k(f_θ(t_s(x))) ; f_φ(t_t(x))).

    ``target``: the target kind (an instance of a registered ``Target``); ``estimator``: the
    estimator; ``modules``: the decoder's modules and those the target kind owns, by name (they
    become attributes: ``term.decoder``, ``term.predictor``, ``term.classes``, ...). A term whose
    estimator uses a temperature (``Estimator.uses_temperature``) keeps its log inverse, learned
    with ``learn_temperature``."""

    def __init__(self, cfg, target, estimator, modules: dict[str, nn.Module]):
        super().__init__()
        self.cfg, self.name, self.target, self.estimator = cfg, cfg.name, target, estimator
        for name, module in modules.items():
            self.add_module(name, module)
        est = cfg.estimator
        scale = torch.tensor(math.log(1.0 / est.temperature) if estimator.uses_temperature else 0.0)
        if estimator.uses_temperature and est.learn_temperature:
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale, persistent=False)

    @property
    def head_to_copy(self) -> nn.Module | None:
        """The online head (the term's projector) that the copied target encoder keeps a copy of,
        when the target passes through it (``target_encoder.head: true``)."""
        enc = self.cfg.target_encoder
        return self.decoder if enc.copies_backbone and getattr(enc, "head", False) else None

    @property
    def temperature(self) -> Tensor:
        return 1.0 / self.log_scale.clamp(max=math.log(100.0)).exp()

    def predict(self, pooled: Tensor) -> Tensor:
        """A global prediction ẑ from pooled features (B, D): projector, then predictor."""
        if not hasattr(self, "predictor"):
            raise TypeError(f"term {self.name!r}: a {self.cfg.decoder.kind!r} decoder makes no global prediction")
        return self.predictor(self.decoder(pooled))

    def view_pairs(self) -> list[tuple[int, int]]:
        """(source view, target view) of each direction the term is computed in."""
        return type(self.target).view_pairs(self.cfg)

    def embed(self, ctx: Context, s: int, t: int) -> Embedding | Scored:
        """The predictions from source view ``s`` and the targets of view ``t``, row by row; the
        loss itself where the target kind computes it in one call."""
        if self.target.in_one_call():
            return Scored(*self.target.loss(self, ctx, s, t))
        return self.target.embed(self, ctx, s, t)

    def score(self, emb: Embedding | Scored, share: Callable[[Tensor], Tensor] = whole) -> Tensor:
        """The term's loss over the rows of :meth:`embed` (``share``: see :meth:`Target.score`)."""
        return emb.loss if isinstance(emb, Scored) else self.target.score(self, emb, share)

    def forward(self, ctx: Context, s: int, t: int) -> tuple[Tensor, int]:
        """-> (loss, number of samples that carried this target)."""
        return self.target.loss(self, ctx, s, t)


__all__ = ["Context", "Embedding", "EmbeddingCache", "Embeddings", "Pair", "Scored", "Term", "Views", "whole"]
