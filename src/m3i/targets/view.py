"""The view target: an image predicts the global embedding of another (or the same) augmented view
(SimCLR, BYOL, MoCo v3)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .base import TARGETS, Embedding, Target, TargetCfg, whole


class ViewCfg(TargetCfg):
    kind: Literal["view"]
    view: int = Field(0, ge=0)  # any view of views.total (Recipe checks it exists)


def view_words(term) -> str:
    """'the full same view' or 'view N'."""
    return "the full same view" if term.target.view == term.source.view else f"view {term.target.view + 1}"


@TARGETS.register
class View(Target):
    kind = "view"
    Config = ViewCfg
    form = "paired"
    encoders = ("ema", "online", "frozen")
    image = True

    @classmethod
    def describe(cls, term) -> str:
        return view_words(term)

    def build(self, cfg, width, backbone, num_classes):
        enc = cfg.target_encoder
        own = enc.copies_backbone and getattr(enc, "backbone", None) is None  # a copy of the online architecture
        if own and not enc.head and width != backbone.embed_dim:
            raise ValueError(f"terms.{cfg.name}: the prediction is {width} wide but the target, the "
                             f"{enc.kind} encoder's pooled features, is {backbone.embed_dim} wide; set "
                             f"target_encoder.head: true (the target passes the copied projector) or end the decoder "
                             f"at {backbone.embed_dim}")
        return {}

    def embed(self, term, ctx, s, t):
        pred = term.predict(ctx.online(s, term.cfg.source.masked).pooled)
        return Embedding(pred, self.target(term, ctx, t), None, pred.shape[0])

    def score(self, term, emb, share=whole):
        return term.estimator.paired(emb.pred, emb.target, emb.avail, share(term.temperature),
                                     **term.estimator.own(share))

    @staticmethod
    def target(term, ctx, t: int):
        enc = term.cfg.target_encoder
        if not enc.copies_backbone:  # the online encoder itself
            z = term.decoder(ctx.online(t, False).pooled)
            return z.detach() if enc.stop_gradient else z
        feats = ctx.target_features(term, t)
        if enc.head:
            with torch.no_grad():
                return ctx.target_head(term)(feats.pooled)
        return feats.pooled
