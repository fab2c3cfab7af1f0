"""The self-distillation teacher as a target encoder f_φ (DINO, iBOT, DINOv2): the EMA copy of the
backbone and of the term's prototype head, whose scores are centred and sharpened into the target
distribution z over the K prototypes.

Centring keeps the teacher from collapsing onto one prototype; sharpening (a teacher temperature
below the student's) keeps it from collapsing onto the uniform distribution. Two ways to centre:

- ``ema`` (DINO): subtract a centre, the EMA of the teacher's mean score over the global batch
  (momentum ``center_momentum``), then a softmax at the teacher temperature;
- ``sinkhorn`` (DINOv2): Sinkhorn–Knopp over the global batch, ``sinkhorn_iterations`` rounds of
  making each prototype's total and then each row's total equal (SwAV's equipartition).

The teacher temperature warms up linearly from ``warmup_temperature`` to ``temperature`` over
``warmup_steps`` optimiser steps. Every statistic is reduced over ranks on the device; nothing is
read back to the host. The centre moves once per optimiser step: the score of a batch computes
its update, :meth:`Centring.after_step` applies it (not at all for a skipped step), so
micro-batches (``train.accum_steps``) move it once, by the whole batch's mean.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .. import distributed as dist
from .base import TARGET_ENCODERS, TargetEncoderCfg


@TARGET_ENCODERS.register
class CentredEMACfg(TargetEncoderCfg):
    """The EMA teacher through its copy of the term's prototype head, centred and sharpened."""

    kind: Literal["centred_ema"]
    copies_backbone: ClassVar[bool] = True
    follows_online: ClassVar[bool] = True
    head: ClassVar[bool] = True  # the target always passes the teacher's copy of the term's head
    centring: Literal["ema", "sinkhorn"] = "ema"
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    sinkhorn_iterations: int = Field(3, ge=1)
    temperature: float = Field(0.07, gt=0)
    warmup_temperature: float = Field(0.04, gt=0)
    warmup_steps: int = Field(0, ge=0)

    def describe(self) -> str:
        if self.centring == "ema":
            how = f"centred (EMA of its mean, m={self.center_momentum:g})"
        else:
            how = f"Sinkhorn–Knopp ({self.sinkhorn_iterations} rounds)"
        warm = f"{self.warmup_temperature:g} → {self.temperature:g}" if self.warmup_steps else f"{self.temperature:g}"
        return f"EMA encoder + prototype head, {how}, sharpened (τ_t={warm})"


def _summed(x: Tensor, op=None) -> Tensor:
    """``x`` reduced over ranks (a sum, or ``op``), on the device; itself with one process."""
    if dist.is_dist() and dist.world_size() > 1:
        x = x.clone()
        tdist.all_reduce(x, op=op or tdist.ReduceOp.SUM)
    return x


def _rows(scores: Tensor, valid: Tensor | None) -> Tensor:
    """(R, 1) float weights of the rows of ``scores`` flattened to (R, K): 1, or 0 where not ``valid``."""
    r = scores.numel() // scores.shape[-1]
    if valid is None:
        return scores.new_ones(r, 1)
    return valid.reshape(r, 1).to(scores.dtype)


@torch.no_grad()
def batch_center(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """(..., K) scores -> (K,) their mean over the rows of every rank (only the ``valid`` (...) ones)."""
    flat = scores.reshape(-1, scores.shape[-1]).float()
    w = _rows(flat, valid)
    total = _summed(torch.cat([(flat * w).sum(0), w.sum().reshape(1)]))
    return total[:-1] / total[-1].clamp(min=1.0)


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, temperature: Tensor | float, iterations: int = 3,
                   valid: Tensor | None = None) -> Tensor:
    """(..., K) teacher scores -> (..., K) assignments, each row summing to 1 (0 where not
    ``valid``), from ``iterations`` rounds of Sinkhorn–Knopp over the rows of every rank: Q = exp(s/τ)
    with each prototype's total, then each row's, made equal. A global constant taken out of the
    exponent (the largest score) and the overall scale of Q cancel in the normalisations."""
    flat = scores.reshape(-1, scores.shape[-1]).float()
    w = _rows(flat, valid)
    top = _summed(torch.where(w > 0, flat, float("-inf")).amax().reshape(1), tdist.ReduceOp.MAX)
    top = torch.where(torch.isfinite(top), top, 0.0)  # no row at all: nothing to assign
    q = torch.exp((flat - top) / temperature) * w
    for _ in range(iterations):
        q = q / _summed(q.sum(0, keepdim=True)).clamp(min=1e-30)   # each prototype's total: equal
        q = q / q.sum(1, keepdim=True).clamp(min=1e-30)           # each row's total: 1
    return (q * w).reshape(scores.shape)


class Centring(nn.Module):
    """The teacher's centring and sharpening of a term (settings: a :class:`CentredEMACfg`), over
    ``prototypes`` K. Buffers: ``center`` (K,), the EMA centre; ``step``, the optimiser steps done
    (the temperature's warm-up); both in checkpoints."""

    def __init__(self, cfg: CentredEMACfg, prototypes: int):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("center", torch.zeros(prototypes))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # the update a batch's score computed, applied after the optimiser step (not saved)
        self.register_buffer("pending", torch.zeros(prototypes), persistent=False)
        self.register_buffer("has_pending", torch.zeros((), dtype=torch.bool), persistent=False)

    def temperature(self) -> Tensor:
        """The teacher temperature at ``step``: a 0-d device tensor."""
        c = self.cfg
        if not c.warmup_steps:
            return torch.full((), c.temperature, device=self.step.device)
        ramp = (self.step.float() / c.warmup_steps).clamp(max=1.0)
        return c.warmup_temperature + (c.temperature - c.warmup_temperature) * ramp

    @torch.no_grad()
    def forward(self, scores: Tensor, valid: Tensor | None = None) -> Tensor:
        """(..., K) teacher scores (only the ``valid`` (...) rows count) -> (..., K) the target
        distributions, float32; with ``ema``, the centre's update from these scores is kept."""
        scores = scores.float()
        tau = self.temperature()
        if self.cfg.centring == "sinkhorn":
            return sinkhorn_knopp(scores, tau, self.cfg.sinkhorn_iterations, valid)
        m = self.cfg.center_momentum
        self.pending.copy_(self.center * m + batch_center(scores, valid) * (1 - m))
        self.has_pending.fill_(True)
        return F.softmax((scores - self.center) / tau, dim=-1)

    @torch.no_grad()
    def after_step(self, step: int, skip: Tensor | None = None) -> None:
        """``step`` optimiser steps are done; the centre takes the update of the last score unless
        the 0-d bool ``skip`` says the step was skipped (decided on the device)."""
        self.step.fill_(step)
        take = self.has_pending if skip is None else self.has_pending & ~skip
        self.center.copy_(torch.where(take, self.pending, self.center))
        self.has_pending.fill_(False)
