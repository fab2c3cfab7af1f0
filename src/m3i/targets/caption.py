"""The caption target: an image predicts its paired caption's text embedding among the batch's (CLIP)."""
from __future__ import annotations

from typing import Literal
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..estimators import ESTIMATORS
from .base import TARGETS, Embedding, Target, TargetCfg, whole


class CaptionCfg(TargetCfg):
    kind: Literal["caption"]


@TARGETS.register
class Caption(Target):
    kind = "caption"
    Config = CaptionCfg
    form = "paired"
    encoders = ("text",)
    needs = "captions"
    pairs_with_text = True

    @classmethod
    def check(cls, term) -> None:
        super().check(term)
        if not ESTIMATORS[term.estimator.kind].contrastive:  # images without a caption must not enter a mean
            fit = " or ".join(repr(k) for k in ESTIMATORS.kinds() if ESTIMATORS[k].contrastive)
            raise ValueError(f"estimator.kind: a 'caption' target is scored with {fit}, got {term.estimator.kind!r}")

    @classmethod
    def describe(cls, term) -> str:
        return "paired caption"

    def build(self, cfg, width, backbone, num_classes):
        tower = cfg.target_encoder.build()
        return {"text": tower, "text_proj": nn.Linear(tower.out_dim, width)}

    def prepare(self, term, data, progress: bool = True) -> None:
        """A frozen tower embeds every caption of the data once, up front."""
        if term.cfg.target_encoder.frozen:
            term.text.precompute(data.captions(), progress=progress)

    @staticmethod
    def encode(term, captions: Sequence[str | None]) -> Tensor:
        """(B, D) target embeddings of captions (no caption: the empty text)."""
        text = term.text([c if c is not None else "" for c in captions])
        return term.text_proj(text.to(term.text_proj.weight.dtype))

    def stage(self, term, batch):
        """On the host: which rows carry a caption, and the tower's input for every row (the empty
        text where there is none)."""
        captions = batch.captions
        avail = torch.tensor([c is not None for c in captions], dtype=torch.bool)
        return {"avail": avail, **term.text.host_inputs([c if c is not None else "" for c in captions])}

    def embed(self, term, ctx, s, t):
        staged = ctx.batch.drawn.targets[term.name]
        avail = staged["avail"]  # rows without a caption are neither anchors nor candidates (fixed shapes)
        pred = term.predict(ctx.online(s, term.cfg.source.masked).pooled)
        target = term.text_proj(term.text.from_host(staged).to(term.text_proj.weight.dtype))
        return Embedding(pred, target, avail, avail.sum())

    def score(self, term, emb, share=whole):
        return term.estimator.paired(emb.pred, emb.target, emb.avail, share(term.temperature),
                                     **term.estimator.own(share))
