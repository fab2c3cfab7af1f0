"""The dense view target: the masked view predicts the features of another (or the same) view at
every patch (SIM, data2vec)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..encoders.copies import dense_target_norm, top_k_average
from ..terms import Pair
from .base import TARGETS, DenseTarget, TargetCfg
from .view import view_words


class DenseViewCfg(TargetCfg):
    kind: Literal["dense_view"]
    view: int = Field(0, ge=0, le=1)
    # mixed input: the first image of each canvas predicts its own view, its partner ``view``
    paired: bool = False


@TARGETS.register
class DenseView(DenseTarget):
    kind = "dense_view"
    Config = DenseViewCfg
    encoders = ("ema", "online", "frozen")

    @classmethod
    def check(cls, term) -> None:
        super().check(term)
        if term.target_encoder.top_k and term.target_encoder.head:
            raise ValueError("target_encoder.head: the top-K layer average (top_k) is read from the backbone's blocks, "
                             "not through a head; set head: false or top_k: 0")
        if term.target.paired and term.decoder.queries != "target_view":
            raise ValueError("target.paired: paired targets are dense features queried over a whole view "
                             "(decoder.queries: target_view)")

    @classmethod
    def check_views(cls, term, views) -> None:
        super().check_views(term, views)
        if term.target.paired and views.input_mode != "mix":
            raise ValueError("target.paired: pairs exist only in the 'mix' input (views.input_mode)")

    @classmethod
    def describe(cls, term) -> str:
        words = "dense features of " + view_words(term)
        return words + (f" (its partner in the canvas: view {term.source.view + 1})" if term.target.paired else "")

    def out_dim(self, cfg, backbone):
        return cfg.decoder.width if cfg.target_encoder.head else backbone.embed_dim

    def query_view(self, term, s, t):
        return Pair(s, t) if term.cfg.target.paired else t

    @torch.no_grad()
    def dense_target(self, term, ctx, t, abs_pos):
        enc = term.cfg.target_encoder
        feats = ctx.target_features(term, t) if enc.copies_backbone else ctx.online(t, False)
        if enc.top_k:
            tokens = top_k_average(feats.layers[-enc.top_k:], enc.norm)
        else:
            tokens = feats.tokens
            if enc.head:  # the copied projector (with SIM's layout: no positions, the class token through it)
                head = ctx.target_head(term)
                cls = feats.pooled if head.cls_token else None
                tokens = head.patch_tokens(head.project(tokens, abs_pos.unsqueeze(0), cls=cls))
            tokens = dense_target_norm(tokens, enc.norm)
        return tokens.float()
