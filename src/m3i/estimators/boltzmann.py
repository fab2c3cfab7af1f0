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
from .base import ESTIMATORS, Estimator, EstimatorCfg, in_fp32


@in_fp32
def boltzmann(pred: Tensor, cand: Tensor, positive: Tensor, temperature: Tensor | float = 1.0,
              bias: Tensor | None = None, exclude: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Mean of −log p̂(z⁺ | ẑ) with p̂ a softmax over candidates, in float32.

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
    return F.cross_entropy(logits, positive, reduction=reduction)


@in_fp32
def batch_boltzmann(pred: Tensor, target: Tensor, avail: Tensor, temperature: Tensor | float,
                    candidates: str = "batch", directions: int = 1) -> Tensor:
    """Boltzmann over the global batch, this rank's share, in float32. ``candidates='batch'``: each
    prediction against every target (``directions=2`` adds targets against predictions, CLIP);
    ``'all'``: against every other prediction and target (NT-Xent). ``avail`` (B,) bool: the rows
    that carry a target; only they are anchors and candidates. Shapes never depend on ``avail``:
    a row without a target weighs 0 as an anchor and is left out of every denominator (but its
    own, which keeps its loss finite), so nothing is read back to the host."""
    b = pred.shape[0]
    all_pred, all_target = dist.gather_with_grad(pred), dist.gather_with_grad(target)
    all_avail = dist.gather(avail)
    g = all_avail.shape[0]
    pos = dist.rank() * b + torch.arange(b, device=pred.device)  # each row's own target in the global batch
    weight = avail.to(pred.dtype)
    # this rank's sum over its anchors, over (global anchors / ranks): DDP's mean over ranks is the
    # mean over the global batch, also when ranks hold different numbers of anchors, or none
    scale = dist.world_size() / all_avail.sum().clamp(min=1)
    if candidates == "batch":
        cols = torch.arange(g, device=pred.device)
        exclude = ~all_avail.unsqueeze(0) & (cols.unsqueeze(0) != pos.unsqueeze(1))
        loss = (boltzmann(pred, all_target, pos, temperature, exclude=exclude, reduction="none") * weight).sum()
        if directions == 2:
            back = boltzmann(target, all_pred, pos, temperature, exclude=exclude, reduction="none")
            loss = (loss + (back * weight).sum()) / 2
        return loss * scale
    z = torch.cat([all_pred, all_target])  # (2G, D): both views of the global batch
    anchors = torch.cat([pred, target])
    own, positive = torch.cat([pos, pos + g]), torch.cat([pos + g, pos])
    cols = torch.arange(2 * g, device=pred.device).unsqueeze(0)
    absent = ~torch.cat([all_avail, all_avail]).unsqueeze(0) & (cols != positive.unsqueeze(1))
    exclude = (cols == own.unsqueeze(1)) | absent
    loss = boltzmann(anchors, z, positive, temperature, exclude=exclude, reduction="none")
    return (loss * torch.cat([weight, weight])).sum() * scale / 2


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
    contrastive = True

    @classmethod
    def check(cls, term, form: str) -> None:
        super().check(term, form)
        cfg, target = term.estimator, term.target.kind
        if form == "classes" and cfg.candidates != "classes":
            raise ValueError(f"estimator.candidates: a {target!r} target is scored against all 'classes'")
        if form == "paired" and cfg.candidates == "classes":
            raise ValueError(f"estimator.candidates: 'classes' needs a label target; a {target!r} target "
                             f"takes 'batch' or 'all'")

    def classes(self, pred, cand, bias, positive, labelled, temperature):
        if self.cfg.normalize:  # the class table normalises its own rows (target_encoder.normalize)
            pred = F.normalize(pred.float(), dim=-1)
        loss = boltzmann(pred, cand, positive, temperature, bias=bias, reduction="none")
        # this rank's sum over (all labelled rows / ranks): DDP's mean over ranks is then the mean
        # over the global batch, whatever each rank drew (a count on the device, never read back)
        count = dist.gather(labelled.long()).sum().clamp(min=1)
        return (loss * labelled.to(loss.dtype)).sum() * dist.world_size() / count

    def paired(self, pred, target, avail, temperature):
        if avail is None:
            avail = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
        if self.cfg.normalize:
            pred, target = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
        return batch_boltzmann(pred, target, avail, temperature,
                               self.cfg.candidates, self.cfg.directions)

    @classmethod
    def describe(cls, cfg: BoltzmannCfg) -> str:
        over = {"classes": "all classes", "batch": "the batch", "all": "the batch, both views (NT-Xent)"}[cfg.candidates]
        return f"Boltzmann over {over}" + (", both directions" if cfg.directions == 2 else "")
