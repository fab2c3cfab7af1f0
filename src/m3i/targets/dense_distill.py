"""The self-distillation target, patch level (iBOT): each masked patch of a global crop, where the
student sees the mask token, predicts the teacher's distribution over prototypes at that patch of
the unmasked crop.

The student's tokens at the hidden patches come from the ``fill`` input (``views.input_mode:
fill``: a learned mask token in their place, ``Features.filled``). Shapes stay fixed: each image
gives up to M masked positions (M from the mask settings: the hidden count, or the largest a ratio
range draws), gathered in patch order and padded with weight 0, never a data-dependent selection.
The loss is each image's mean over its masked patches, averaged over the images of every global
crop (an image with no masked patch counts 0, as DINOv2 weighs it). The head is the term's own
(``decoder: {kind: prototypes}``) or another term's (``decoder: {kind: shared, term: dino}``:
DINOv2's ``ibot.separate_head: false``); the teacher's centre is the term's own, over the masked
patches.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor

from .base import TARGETS, Embedding, TargetCfg, whole
from .distill import OverPrototypes


class DenseDistillCfg(TargetCfg):
    kind: Literal["dense_distill"]
    distribution: ClassVar[bool] = True


def masked_positions(visible: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """(B, N) bool visible patches -> ((B, count) indices of the first ``count`` hidden patches in
    patch order, padded with visible ones where a row hides fewer; (B, count) bool, True at the
    hidden ones). Fixed shapes, nothing read back."""
    order = torch.argsort(visible.to(torch.int8), dim=1, stable=True)[:, :count]
    return order, ~torch.gather(visible, 1, order)


def masked_capacity(views_cfg, n: int, visible_count: int | None) -> int:
    """M, the most patches a mask of the recipe's views hides in a row of ``n``: the exact count
    where every row hides the same (``visible_count`` < ``n``); else from the largest share of
    ``views.mask.ratio`` (a number, or the top of a range); ``n`` when nothing tells."""
    if visible_count is not None and visible_count < n:
        return n - visible_count
    mask = getattr(views_cfg, "mask", None)
    if mask is None:
        return n
    top = mask.ratio_range[1] if hasattr(mask, "ratio_range") else mask.ratio
    return min(n, math.ceil(float(top) * n))


def gather_tokens(tokens: Tensor, idx: Tensor) -> Tensor:
    """(B, N, D) tokens at (B, M) positions -> (B, M, D)."""
    return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


@TARGETS.register
class DenseDistill(OverPrototypes):
    kind = "dense_distill"
    Config = DenseDistillCfg
    form = "dense"

    @classmethod
    def check(cls, term) -> None:
        super().check(term)
        if not term.source.masked:
            raise ValueError("source.masked: a 'dense_distill' target is predicted at the masked patches of the "
                             "global crops; set source.masked: true")

    @classmethod
    def check_views(cls, term, views) -> None:
        if views.input_mode != "fill":
            raise ValueError(f"target.kind: a 'dense_distill' target is predicted from the mask tokens at the hidden "
                             f"patches: it needs views.input_mode fill, got {views.input_mode!r}")

    @classmethod
    def views(cls, term, views_cfg) -> set[int]:
        return set(views_cfg.global_views())

    @classmethod
    def masked_views(cls, term, views_cfg) -> set[int]:
        return set(views_cfg.global_views())

    @classmethod
    def describe(cls, term) -> str:
        return "the teacher's distribution over prototypes at each masked patch of the unmasked crop"

    @classmethod
    def describe_input(cls, term, masked):
        return f"{masked}global views"

    def embed(self, term, ctx, s, t):
        g, b = self.global_views(), ctx.batch_size
        n = ctx.grid_size[0] * ctx.grid_size[1]
        student, teacher, valid = [], [], []
        for v in g:
            idx, hidden = masked_positions(ctx.visible(v), masked_capacity(self.views_cfg, n, ctx.visible_count(v)))
            student.append(gather_tokens(ctx.online(v, True).filled, idx))
            teacher.append(gather_tokens(ctx.target_features(term, v).tokens, idx))
            valid.append(hidden)
        m = idx.shape[1]
        pred = self.head(term)(torch.cat(student)).unflatten(0, (len(g), b)).transpose(0, 1)   # (B, G, M, K)
        with torch.no_grad():
            target = self.teacher_head(term, ctx)(torch.cat(teacher)).unflatten(0, (len(g), b)).transpose(0, 1)
        valid = torch.stack(valid, 1).reshape(b, len(g), m)
        return Embedding(pred, target, valid, b)

    def score(self, term, emb, share=whole):
        q = term.centring(emb.target, emb.avail)  # centred over the masked patches only
        return term.estimator.dense(emb.pred, q, emb.avail, share(term.temperature))
