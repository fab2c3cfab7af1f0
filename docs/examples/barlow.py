"""Barlow Twins as an estimator: the cross-correlation of the two sides' embeddings, standardised
over the global batch, pushed to the identity (on-diagonal to 1, off-diagonal to 0).

Copy this file to ``src/m3i/estimators/barlow.py``: the package imports it and the recipe key
``estimator: {kind: barlow}`` works in every recipe, with no other change.
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor

from .. import distributed as dist
from .base import ESTIMATORS, Estimator, EstimatorCfg


class BarlowCfg(EstimatorCfg):
    kind: Literal["barlow"]
    lam: float = 5e-3  # weight of the off-diagonal (redundancy) terms


@ESTIMATORS.register
class Barlow(Estimator):
    kind = "barlow"
    Config = BarlowCfg
    forms = frozenset({"paired"})  # one global target per image

    def paired(self, pred: Tensor, target: Tensor, avail: Tensor | None, temperature: Tensor) -> Tensor:
        if avail is not None:
            pred, target = pred[avail], target[avail]
        a = dist.gather_with_grad(pred.float())  # the statistics span every rank's rows
        b = dist.gather_with_grad(target.float())
        a = (a - a.mean(0)) / a.std(0, unbiased=False).clamp_min(1e-6)  # as a batch norm does
        b = (b - b.mean(0)) / b.std(0, unbiased=False).clamp_min(1e-6)
        c = a.t() @ b / a.shape[0]
        on = (c.diagonal() - 1).pow(2).sum()
        off = c.pow(2).sum() - c.diagonal().pow(2).sum()
        return on + self.cfg.lam * off

    @classmethod
    def describe(cls, cfg: BarlowCfg) -> str:
        return f"Barlow Twins (λ={cfg.lam})"
