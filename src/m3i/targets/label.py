"""The category target: a labelled image predicts its class among every class (supervised)."""
from __future__ import annotations

from typing import Literal

import torch

from .. import distributed as dist
from ..encoders.class_table import ClassTable
from .base import TARGETS, Target, TargetCfg, zero_loss


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
        rows = (label >= 0).nonzero().squeeze(1)
        pooled = ctx.online(s, term.cfg.source.masked).pooled
        # every rank counts the labelled rows of all ranks (a collective, so before any early return)
        n_all = int(dist.gather(torch.tensor([rows.numel()], device=label.device)).sum())
        if rows.numel() == 0:
            return zero_loss(term, pooled), 0
        pred = term.predict(pooled[rows])
        cand, bias = term.classes()
        return term.estimator.classes(pred, cand, bias, label[rows], term.temperature, n_all), int(rows.numel())
