"""Sigmoid estimator (SigLIP): every pair (i, j) of the global batch is a binary problem, the pair
of an image and its own caption positive and every other pair negative, with p̂(positive | ẑ_i, z_j)
= σ(t·ẑ_i·z_j + b), a learned temperature t and bias b. It estimates the same density ratio as the
Boltzmann estimator over the batch without normalising over the candidates.

The loss follows SigLIP's normalisation: the negative log-likelihood summed over a row's pairs,
averaged over the rows (the images that carry a caption). A row without a caption is neither an
image nor a caption of any pair, at a fixed shape.

Across ranks each rank scores its own images against the captions of the global batch (gathered
with gradient): its memory is O(local batch × global batch), and DDP's mean over ranks of each
rank's share is the single-process loss of the global batch, gradient included.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .. import distributed as dist
from .base import ESTIMATORS, Estimator, EstimatorCfg, in_fp32


@in_fp32
def batch_sigmoid(pred: Tensor, target: Tensor, avail: Tensor, scale: Tensor | float,
                  bias: Tensor | float) -> Tensor:
    """SigLIP over the global batch, this rank's share, in float32.

    pred (B, D): this rank's predictions ẑ (images); target (B, D): their targets z (captions),
    row i's own at row i; avail (B,) bool: the rows that carry a target; scale t and bias b.
    -> Σ_i Σ_j −log σ(s_ij (t·ẑ_i·z_j + b)) over this rank's rows i and the global batch's j,
    both available, s_ij = +1 for a row's own caption and −1 otherwise; divided by the global
    number of available rows over the number of ranks (DDP's mean is the global batch's loss)."""
    b = pred.shape[0]
    all_target, all_avail = dist.gather_with_grad(target), dist.gather(avail)
    own = dist.rank() * b + torch.arange(b, device=pred.device)
    cols = torch.arange(all_target.shape[0], device=pred.device)
    sign = (cols.unsqueeze(0) == own.unsqueeze(1)).to(pred.dtype) * 2 - 1        # (B, G): +1 own, −1 others
    logits = pred @ all_target.t() * scale + bias
    pairs = avail.unsqueeze(1) & all_avail.unsqueeze(0)
    nll = -torch.where(pairs, F.logsigmoid(sign * logits), 0.0).sum()
    return nll * dist.world_size() / all_avail.sum().clamp(min=1)


class SigmoidCfg(EstimatorCfg):
    kind: Literal["sigmoid"]
    # 1 / t: SigLIP's t = exp(t') starts at 10 (t' = log 10), learned
    temperature: float = Field(0.1, gt=0)
    learn_temperature: bool = True
    # b: SigLIP's −10 keeps the loss of the many negatives small at the start
    bias: float = -10.0
    learn_bias: bool = True
    normalize: bool = True


@ESTIMATORS.register
class Sigmoid(nn.Module, Estimator):
    """The term's estimator and the holder of its bias (``bias``, a 0-d parameter of the term:
    ``terms.N.estimator.bias``); its temperature is the term's own, as for every estimator that
    ``uses_temperature``."""

    kind = "sigmoid"
    Config = SigmoidCfg
    forms = frozenset({"paired"})
    uses_temperature = True
    contrastive = True

    def __init__(self, cfg: SigmoidCfg):
        nn.Module.__init__(self)
        self.cfg = cfg
        bias = torch.tensor(float(cfg.bias))
        if cfg.learn_bias:
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("bias", bias, persistent=False)

    def own(self, share=lambda x: x) -> dict[str, Tensor]:
        return {"bias": share(self.bias)}

    def paired(self, pred, target, avail, temperature, bias: Tensor | None = None):
        if avail is None:
            avail = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
        if self.cfg.normalize:
            pred, target = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
        return batch_sigmoid(pred, target, avail, 1.0 / temperature, self.bias if bias is None else bias)

    @classmethod
    def describe(cls, cfg: SigmoidCfg) -> str:
        return f"sigmoid over the pairs of the batch (t = {1 / cfg.temperature:g}, b = {cfg.bias:g})"


__all__ = ["Sigmoid", "SigmoidCfg", "batch_sigmoid"]
