"""The self-distillation target, image level (DINO): every crop of an image, global and local,
predicts the teacher's distribution over K prototypes of each other global crop.

The student (the online encoder and the term's prototype head, ``decoder: {kind: prototypes}``)
scores every crop of the recipe's views: the ``views.count`` global views (masked when
``source.masked``: DINOv2's student sees its global crops masked, the same forward pass its iBOT
and KoLeo terms read) and the local crops of ``views.local``. The teacher (``target_encoder:
{kind: centred_ema}``) scores the global views, unmasked, through its copy of the head; its
scores are centred and sharpened into distributions (:class:`m3i.encoders.centred.Centring`),
and the estimator takes the cross-entropy of every pair of teacher crop i and student crop v ≠ i.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from ..decoders.prototypes import PrototypesCfg, SharedCfg
from ..encoders.centred import Centring
from ..estimators import ESTIMATORS
from .base import TARGETS, Embedding, Target, TargetCfg, whole


class DistillCfg(TargetCfg):
    kind: Literal["distill"]
    distribution: ClassVar[bool] = True  # a distribution over prototypes (estimator: cross_entropy)


def check_distribution(kind: str, term) -> None:
    """A target over prototypes is scored by an estimator of soft targets."""
    est = term.estimator.kind
    if not getattr(ESTIMATORS[est], "soft_targets", False):
        fit = " or ".join(repr(k) for k in ESTIMATORS.kinds() if getattr(ESTIMATORS[k], "soft_targets", False))
        raise ValueError(f"estimator.kind: a {kind!r} target is the teacher's distribution over prototypes; it "
                         f"takes {fit}, got {est!r}")


class OverPrototypes(Target):
    """What the image- and patch-level targets over prototypes share: the teacher, its centring
    (built onto the term as ``centring``), the heads (the term's own or the one it shares,
    ``head_owner``) and the after-step hook."""

    encoders = ("centred_ema",)
    image = True
    head_owner = None  # the term whose head a ``shared`` decoder reads (set when the terms are linked)

    @classmethod
    def check(cls, term) -> None:
        super().check(term)
        if not isinstance(term.decoder, (PrototypesCfg, SharedCfg)):
            raise ValueError(f"decoder.kind: a {cls.kind!r} target is scored over the prototypes of a 'prototypes' "
                             f"head (or 'shared': another term's), got {term.decoder.kind!r}")
        check_distribution(cls.kind, term)
        if term.swap_views:
            raise ValueError(f"swap_views: a {cls.kind!r} target reads every crop already, in one direction; "
                             f"leave swap_views false")

    @classmethod
    def view_pairs(cls, term) -> list[tuple[int, int]]:
        return [(0, 0)]  # one direction: every pair of crops at once

    def build(self, cfg, width, backbone, num_classes):
        return {"centring": Centring(cfg.target_encoder, width)}

    def owner(self, term):
        """The term whose prototype head this term reads: itself, or the one it shares."""
        return term if self.head_owner is None else self.head_owner

    def head(self, term) -> nn.Module:
        """The student's prototype head."""
        return self.owner(term).decoder

    def teacher_head(self, term, ctx) -> nn.Module:
        """The teacher's copy of that head."""
        return ctx.target_head(self.owner(term))

    def global_views(self) -> list[int]:
        if self.views_cfg is None:
            raise ValueError(f"a {self.kind!r} target reads the recipe's views: build its term with them "
                             f"(m3i.targets.build_terms)")
        return self.views_cfg.global_views()

    def after_step(self, term, step, skip=None):
        super().after_step(term, step, skip)
        term.centring.after_step(step, skip)


@TARGETS.register
class Distill(OverPrototypes):
    kind = "distill"
    Config = DistillCfg
    form = "paired"

    @classmethod
    def views(cls, term, views_cfg) -> set[int]:
        return set(range(views_cfg.total))

    @classmethod
    def masked_views(cls, term, views_cfg) -> set[int]:
        return set(views_cfg.global_views()) if term.source.masked else set()

    @classmethod
    def check_views(cls, term, views) -> None:
        if views.total < 2:
            raise ValueError("target.kind: a 'distill' target pairs each global crop with the other crops; give "
                             "views.count 2 or more, or local crops (views.local)")

    @classmethod
    def describe(cls, term) -> str:
        return "the teacher's distribution over prototypes of each other global crop"

    @classmethod
    def describe_input(cls, term, masked):
        return f"every crop ({masked if term.source.masked else ''}global views, local crops)"

    def embed(self, term, ctx, s, t):
        g, masked = self.global_views(), term.cfg.source.masked
        crops = range(self.views_cfg.total)
        b = ctx.batch_size
        pooled = torch.cat([ctx.online(v, masked and v in g).pooled for v in crops])     # (V·B, D)
        pred = self.head(term)(pooled).unflatten(0, (len(crops), b)).transpose(0, 1)     # (B, V, K)
        with torch.no_grad():
            teacher = torch.cat([ctx.target_features(term, v).pooled for v in g])
            target = self.teacher_head(term, ctx)(teacher).unflatten(0, (len(g), b)).transpose(0, 1)
        return Embedding(pred, target, None, b)

    def score(self, term, emb, share=whole):
        q = term.centring(emb.target)  # (B, G, K): the teacher's centred, sharpened distributions
        return term.estimator.paired(emb.pred, q, emb.avail, share(term.temperature))
