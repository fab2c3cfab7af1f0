"""UniGrad, SIM's dense estimator: a squared error plus a correlation penalty that plays the role
of the Boltzmann denominator for dense targets."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .base import ESTIMATORS, Estimator, EstimatorCfg, in_fp32


@in_fp32
def unigrad(pred: Tensor, target: Tensor, lam: float = 0.02, correlation: Tensor | None = None) -> Tensor:
    """SIM's UniGrad dense loss over N target tokens, in float32.

    pred, target: (N, D). correlation: (D, D) = mean(t tᵀ) over the tokens of every rank;
    computed from ``target`` when not given.
    L = (mean‖p − t‖² + λ · mean(pᵀ C p)) / D
    """
    if correlation is None:
        correlation = target.t() @ target / max(target.shape[0], 1)
    pos = (pred - target).pow(2).sum(-1).mean()
    neg = ((pred @ correlation) * pred).sum(-1).mean()
    return (pos + lam * neg) / pred.shape[-1]


@in_fp32
def target_correlation(target: Tensor) -> Tensor:
    """mean(t tᵀ) over tokens, averaged across ranks when torch.distributed is running, in float32
    (the all-reduce too). target: (N, D)."""
    total = target.t() @ target
    count = torch.full((), float(target.shape[0]), device=target.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    return total / count.clamp_min(1.0)


class UniGradCfg(EstimatorCfg):
    kind: Literal["unigrad"]
    lam: float = 0.02


@ESTIMATORS.register
class UniGrad(Estimator):
    kind = "unigrad"
    Config = UniGradCfg
    forms = frozenset({"dense"})

    def dense(self, pred, target):
        return unigrad(pred, target, self.cfg.lam, target_correlation(target))

    @classmethod
    def describe(cls, cfg: UniGradCfg) -> str:
        return f"UniGrad (λ={cfg.lam})"
