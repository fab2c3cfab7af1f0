"""The cross-entropy over prototypes (DINO, iBOT): p̂(· | ẑ) = softmax(ẑ/τ_s) is a Boltzmann over
the K learned prototypes, and its target is not one prototype but the teacher's distribution q over
them, so −E log p̂ becomes the cross-entropy −Σ_k q_k log p̂_k. It is the same bound
I(ẑ; z) ≥ H(z) + E log p̂(z | ẑ) with a soft z; the teacher's centring and sharpening (its target
encoder, :mod:`m3i.encoders.centred`) keep H(z) from collapsing.

Two shapes, each this rank's share of the mean over the global batch (every rank holds as many rows):

- image level (:func:`crop_cross_entropy`): every pair of a teacher crop and a student crop from
  different views, mean over the pairs (DINO's multi-crop);
- patch level (:func:`patch_cross_entropy`): per image, the mean over its masked patches (0 where
  none is masked), then the mean over images (iBOT, weighed as DINOv2 weighs it).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .base import ESTIMATORS, Estimator, EstimatorCfg, in_fp32


def other_crops(teacher: int, student: int, device=None) -> Tensor:
    """(G, V) bool: teacher crop i against every student crop v ≠ i (the teacher's G crops are the
    student's first G)."""
    return torch.arange(teacher, device=device).unsqueeze(1) != torch.arange(student, device=device)


@in_fp32
def crop_cross_entropy(pred: Tensor, target: Tensor, temperature: Tensor | float,
                       pairs: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
    """Mean over crop pairs of the batch's mean −Σ_k q_k log softmax(s/τ)_k, in float32.

    pred: (B, V, K) the student's scores of V crops; target: (B, G, K) the teacher's distributions
    of G crops; pairs: (G, V) bool, the pairs that count (default :func:`other_crops`); weight:
    optional (B,) weight of each row (the mean over rows is then over the weight)."""
    b, v, _ = pred.shape
    g = target.shape[1]
    if pairs is None:
        pairs = other_crops(g, v, pred.device)
    log_p = F.log_softmax(pred / temperature, dim=-1)
    ce = -torch.einsum("bgk,bvk->bgv", target, log_p)               # (B, G, V)
    rows = ce.mean(0) if weight is None else (ce * weight.view(b, 1, 1)).sum(0) / weight.sum().clamp(min=1)
    pairs = pairs.to(ce.dtype)
    return (rows * pairs).sum() / pairs.sum().clamp(min=1)


@in_fp32
def patch_cross_entropy(pred: Tensor, target: Tensor, valid: Tensor, temperature: Tensor | float) -> Tensor:
    """Mean over images of the mean over each image's masked patches of −Σ_k q_k log softmax(s/τ)_k,
    in float32 (an image with none counts 0).

    pred: (..., M, K) the student's scores at up to M masked patches of each image; target: (..., M, K)
    the teacher's distributions there; valid: (..., M) bool, False at padding."""
    ce = -(target * F.log_softmax(pred / temperature, dim=-1)).sum(-1)
    w = valid.to(ce.dtype)
    return ((ce * w).sum(-1) / w.sum(-1).clamp(min=1)).mean()


class CrossEntropyCfg(EstimatorCfg):
    kind: Literal["cross_entropy"]
    temperature: float = Field(0.1, gt=0)  # the student's τ_s
    learn_temperature: bool = False


@ESTIMATORS.register
class CrossEntropy(Estimator):
    """Scores a target that is a distribution over prototypes (a target kind whose settings say
    ``distribution``): the teacher's, against the student's scores ẑ at temperature τ_s."""

    kind = "cross_entropy"
    Config = CrossEntropyCfg
    forms = frozenset({"paired", "dense"})
    uses_temperature = True
    soft_targets: ClassVar[bool] = True

    @classmethod
    def check(cls, term, form: str) -> None:
        super().check(term, form)
        if not getattr(term.target, "distribution", False):
            raise ValueError(f"estimator.kind: 'cross_entropy' scores a distribution over prototypes ('distill' or "
                             f"'dense_distill' targets); a {term.target.kind!r} target is none")

    def paired(self, pred, target, avail, temperature, pairs=None):
        """pred (B, V, K) and target (B, G, K) (see :func:`crop_cross_entropy`), or (B, K) each:
        row i's distribution is target[i]."""
        if pred.dim() == 2:
            pred, target = pred.unsqueeze(1), target.unsqueeze(1)
            pairs = torch.ones(1, 1, dtype=torch.bool, device=pred.device)
        weight = None if avail is None else avail.float()
        return crop_cross_entropy(pred, target, temperature, pairs, weight)

    def dense(self, pred, target, valid=None, temperature=1.0):
        """pred, target (..., M, K); valid (..., M) bool (None: every patch)."""
        if valid is None:
            valid = torch.ones(pred.shape[:-1], dtype=torch.bool, device=pred.device)
        return patch_cross_entropy(pred, target, valid, temperature)

    @classmethod
    def describe(cls, cfg: CrossEntropyCfg) -> str:
        return f"cross-entropy over the prototypes (τ_s={cfg.temperature:g})"
