"""The category target: a labelled image predicts its class among every class (supervised)."""
from __future__ import annotations

from typing import Literal

from ..encoders.class_table import ClassTable
from .base import TARGETS, Target, TargetCfg


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

    def loss(self, term, ctx, s, t):
        label = ctx.batch["label"]
        labelled = label >= 0  # every row is predicted; those without a label weigh 0 (fixed shapes)
        pred = term.predict(ctx.online(s, term.cfg.source.masked).pooled)
        cand, bias = term.classes()
        loss = term.estimator.classes(pred, cand, bias, label.clamp(min=0), labelled, term.temperature)
        return loss, labelled.sum()
