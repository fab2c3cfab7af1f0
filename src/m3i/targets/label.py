"""The category target: a labelled image predicts its class among every class (supervised)."""
from __future__ import annotations

from typing import Literal

from ..encoders.class_table import ClassTable
from .base import TARGETS, Embedding, Target, TargetCfg, whole


class LabelCfg(TargetCfg):
    kind: Literal["label"]


@TARGETS.register
class Label(Target):
    kind = "label"
    Config = LabelCfg
    form = "classes"
    encoders = ("class_table",)
    needs = "labels"

    @classmethod
    def describe(cls, term) -> str:
        return "category"

    @classmethod
    def num_classes_in(cls, state, prefix):
        table = state.get(prefix + "classes.weight")
        return 0 if table is None else int(table.shape[0])

    def build(self, cfg, width, backbone, num_classes):
        enc = cfg.target_encoder
        return {"classes": ClassTable(num_classes, width, enc.normalize, enc.bias)}

    def embed(self, term, ctx, s, t):
        label = ctx.batch.labels
        labelled = label >= 0  # every row is predicted; those without a label weigh 0 (fixed shapes)
        pred = term.predict(ctx.online(s, term.cfg.source.masked).pooled)
        return Embedding(pred, label.clamp(min=0), labelled, labelled.sum())

    def score(self, term, emb, share=whole):
        cand, bias = term.classes()
        return term.estimator.classes(emb.pred, share(cand), None if bias is None else share(bias), emb.target,
                                      emb.avail, share(term.temperature))
