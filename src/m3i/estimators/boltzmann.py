"""Boltzmann estimator: p̂(z | ẑ) = exp(ẑ·z/τ) / Σ_{z'∈Z} exp(ẑ·z'/τ), a softmax cross-entropy over
the candidates Z: every class (a classifier), the global batch (CLIP, MoCo v3) or the batch of
both views (SimCLR's NT-Xent)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .. import distributed as dist
from .base import ESTIMATORS, Estimator, EstimatorCfg


def boltzmann(pred: Tensor, cand: Tensor, positive: Tensor, temperature: Tensor | float = 1.0,
              bias: Tensor | None = None, exclude: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Mean of −log p̂(z⁺ | ẑ) with p̂ a softmax over candidates.

    pred: (B, D) predictions ẑ; cand: (M, D) candidate targets Z; positive: (B,) index of
    each row's own target in ``cand``; bias: optional (M,) log-prior per candidate (a linear
    classifier's bias); exclude: optional (B, M) bool of candidates left out of the
    denominator (a row's own prediction in NT-Xent).
    """
    logits = pred @ cand.t() / temperature
    if bias is not None:
        logits = logits + bias
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(logits.float(), positive, reduction=reduction)


def batch_boltzmann(pred: Tensor, target: Tensor, avail: Tensor, temperature: Tensor | float,
                    candidates: str = "batch", directions: int = 1) -> Tensor:
    """Boltzmann over the global batch, this rank's share. ``candidates='batch'``: each prediction
    against every target (``directions=2`` adds targets against predictions, CLIP); ``'all'``:
    against every other prediction and target (NT-Xent). ``avail`` (B,) bool: the rows that carry
    a target; only they are anchors and candidates."""
    b = pred.shape[0]
    all_pred, all_target = dist.gather_with_grad(pred), dist.gather_with_grad(target)
    all_avail = dist.gather(avail)
    cand = all_avail.nonzero().squeeze(1)
    index = torch.cumsum(all_avail.long(), 0) - 1      # position of each global row among the candidates
    rows = avail.nonzero().squeeze(1)
    pos = index[dist.rank() * b + rows]
    # this rank's sum over its anchors, over (global anchors / ranks): DDP's mean over ranks is the
    # mean over the global batch, also when ranks hold different numbers of anchors, or none (a sum
    # over no rows is 0 and still reaches the gathered tensors, whose backward is a collective)
    scale = dist.world_size() / max(cand.numel(), 1)
    if candidates == "batch":
        loss = boltzmann(pred[rows], all_target[cand], pos, temperature, reduction="sum")
        if directions == 2:
            loss = (loss + boltzmann(target[rows], all_pred[cand], pos, temperature, reduction="sum")) / 2
        return loss * scale
    m = cand.numel()
    z = torch.cat([all_pred[cand], all_target[cand]])
    anchors = torch.cat([pred[rows], target[rows]])
    self_idx = torch.cat([pos, pos + m])
    exclude = torch.zeros(anchors.shape[0], 2 * m, dtype=torch.bool, device=z.device)
    exclude[torch.arange(anchors.shape[0], device=z.device), self_idx] = True
    return boltzmann(anchors, z, torch.cat([pos + m, pos]), temperature, exclude=exclude, reduction="sum") * scale / 2


class BoltzmannCfg(EstimatorCfg):
    kind: Literal["boltzmann"]
    temperature: float = Field(0.1, gt=0)
    learn_temperature: bool = False
    # the candidates Z: every class (label targets), the global batch, or the batch of both views
    candidates: Literal["classes", "batch", "all"] = "batch"
    directions: Literal[1, 2] = 1
    normalize: bool = True


@ESTIMATORS.register
class Boltzmann(Estimator):
    kind = "boltzmann"
    Config = BoltzmannCfg
    forms = frozenset({"classes", "paired"})
    uses_temperature = True

    @classmethod
    def check(cls, term, form: str) -> None:
        super().check(term, form)
        cfg, target = term.estimator, term.target.kind
        if form == "classes" and cfg.candidates != "classes":
            raise ValueError(f"estimator.candidates: a {target!r} target is scored against all 'classes'")
        if form == "paired" and cfg.candidates == "classes":
            raise ValueError(f"estimator.candidates: 'classes' needs a label target; a {target!r} target "
                             f"takes 'batch' or 'all'")

    def classes(self, pred, cand, bias, positive, temperature, count):
        if self.cfg.normalize:  # the class table normalises its own rows (target_encoder.normalize)
            pred = F.normalize(pred, dim=-1)
        loss = boltzmann(pred, cand, positive, temperature, bias=bias, reduction="sum")
        # this rank's sum over (all labelled rows / ranks): DDP's mean over ranks is then the mean
        # over the global batch, whatever each rank drew
        return loss * dist.world_size() / count

    def paired(self, pred, target, avail, temperature):
        if avail is None:
            avail = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
        if self.cfg.normalize:
            pred, target = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
        return batch_boltzmann(pred.float(), target.float(), avail, temperature,
                               self.cfg.candidates, self.cfg.directions)

    @classmethod
    def describe(cls, cfg: BoltzmannCfg) -> str:
        over = {"classes": "all classes", "batch": "the batch", "all": "the batch, both views (NT-Xent)"}[cfg.candidates]
        return f"Boltzmann over {over}" + (", both directions" if cfg.directions == 2 else "")
