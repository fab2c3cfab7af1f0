"""Gaussian estimator: p̂(z | ẑ) ∝ exp(−‖ẑ − z‖² / 2σ²), a squared error (BYOL, MAE, data2vec)."""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from .base import ESTIMATORS, Estimator, EstimatorCfg, in_fp32


@in_fp32
def gaussian(pred: Tensor, target: Tensor, normalize: bool = False, reduce: str = "mean",
             weight: Tensor | None = None) -> Tensor:
    """Squared error −log p̂ of a Gaussian p̂ (up to constants), averaged over rows, in float32.

    pred, target: (..., D). normalize: compare unit vectors (‖a − b‖² = 2 − 2cos, BYOL).
    reduce: "mean" averages over D (MSE), "sum" sums over D. weight: optional (...,) weight of
    each row (0: a row without a target); the mean is then over the weight.
    """
    if normalize:
        pred, target = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    err = (pred - target).pow(2)
    err = err.mean(-1) if reduce == "mean" else err.sum(-1)
    if weight is None:
        return err.mean()
    return (err * weight).sum() / weight.sum().clamp(min=1)


class GaussianCfg(EstimatorCfg):
    kind: Literal["gaussian"]
    # compare unit vectors (BYOL)
    normalize: bool = False
    reduce: Literal["mean", "sum"] = "mean"


@ESTIMATORS.register
class Gaussian(Estimator):
    """No candidates, so nothing pushes predictions apart: the target must not follow the
    prediction's gradient (an EMA or frozen encoder, or an explicit stop-gradient)."""

    kind = "gaussian"
    Config = GaussianCfg
    forms = frozenset({"paired", "dense"})

    @classmethod
    def check(cls, term, form: str) -> None:
        super().check(term, form)
        enc = term.target_encoder
        if form == "paired" and enc.online_with_gradient():
            raise ValueError("target_encoder.stop_gradient: a Gaussian estimate against the online encoder "
                             "collapses (both sides move to a constant) unless the target's gradient is "
                             "stopped; set target_encoder.stop_gradient: true, or use an 'ema' target encoder")

    def paired(self, pred, target, avail, temperature):
        weight = None if avail is None else avail.float()  # fixed shapes: no selection of the rows
        return gaussian(pred, target, self.cfg.normalize, self.cfg.reduce, weight)

    def dense(self, pred, target):
        return gaussian(pred, target, self.cfg.normalize, self.cfg.reduce)

    @classmethod
    def describe(cls, cfg: GaussianCfg) -> str:
        return "Gaussian" + (" on normalised features" if cfg.normalize else "")
