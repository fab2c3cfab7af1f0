"""The entropy target: no z at all, the prediction's own entropy H(ẑ), the half of
I(ẑ; z) = H(ẑ) − H(ẑ | z) that the other targets leave to their estimators' denominators. Scored by
an entropy estimator (``koleo``); DINOv2 adds it on the pooled features of each global crop
(``swap_views: true``: both global views, their terms summed)."""
from __future__ import annotations

from typing import ClassVar, Literal

from ..estimators import ESTIMATORS
from .base import TARGETS, Embedding, Target, TargetCfg, whole


class EntropyCfg(TargetCfg):
    kind: Literal["entropy"]
    entropy: ClassVar[bool] = True  # scored by an estimate of the prediction's entropy


@TARGETS.register
class Entropy(Target):
    kind = "entropy"
    Config = EntropyCfg
    form = "paired"
    encoders = ("identity",)

    @classmethod
    def check(cls, term) -> None:
        super().check(term)
        est = term.estimator.kind
        if not getattr(ESTIMATORS[est], "estimates_entropy", False):
            fit = " or ".join(repr(k) for k in ESTIMATORS.kinds() if getattr(ESTIMATORS[k], "estimates_entropy", False))
            raise ValueError(f"estimator.kind: an 'entropy' target is scored by an entropy estimator ({fit}), "
                             f"got {est!r}")

    @classmethod
    def describe(cls, term) -> str:
        return "none: the prediction's entropy H(ẑ)"

    def embed(self, term, ctx, s, t):
        pred = term.predict(ctx.online(s, term.cfg.source.masked).pooled)
        return Embedding(pred, pred.new_zeros(pred.shape[0], 0), None, pred.shape[0])

    def score(self, term, emb, share=whole):
        return term.estimator.paired(emb.pred, emb.target, emb.avail, share(term.temperature))
