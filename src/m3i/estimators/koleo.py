"""KoLeo: the Kozachenko–Leonenko estimate of the entropy H(ẑ) of the predictions, the half of
I(ẑ; z) = H(ẑ) − H(ẑ | z) that no target scores. Up to constants it is the mean log distance of
each prediction (L2-normalised) to its nearest neighbour in the batch; maximising it spreads the
predictions over the sphere (Sablayrolles et al., 2019; DINOv2 adds it to DINO's term).

The neighbours are searched over the global batch: each rank's rows against every rank's (an
all-gather with gradient, memory O(local × global)), so the estimate on W ranks of B rows equals
one process's on the W·B rows.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .. import distributed as dist
from .base import ESTIMATORS, Estimator, EstimatorCfg, in_fp32


@in_fp32
def koleo(pred: Tensor, eps: float = 1e-8) -> Tensor:
    """−mean log(‖x − x_nn‖ + eps) over this rank's rows, x = pred (B, D) L2-normalised and x_nn its
    nearest other row of the global batch, in float32 (this rank's share of the global mean)."""
    x = F.normalize(pred, dim=-1, eps=eps)
    every = dist.gather_with_grad(x)                                  # (W·B, D)
    b = x.shape[0]
    own = dist.rank() * b + torch.arange(b, device=x.device)
    with torch.no_grad():
        dots = x @ every.t()                                          # the nearest: the largest cosine
        dots.scatter_(1, own.unsqueeze(1), float("-inf"))
        nearest = dots.argmax(dim=1)
    d = (x - every.index_select(0, nearest) + eps).norm(dim=-1)       # torch's pairwise distance
    return -(d + eps).log().mean()


class KoLeoCfg(EstimatorCfg):
    kind: Literal["koleo"]
    eps: float = Field(1e-8, gt=0)


@ESTIMATORS.register
class KoLeo(Estimator):
    """An estimate of H(ẑ) alone: it scores the ``entropy`` target (the prediction itself)."""

    kind = "koleo"
    Config = KoLeoCfg
    forms = frozenset({"paired"})
    estimates_entropy: ClassVar[bool] = True

    @classmethod
    def check(cls, term, form: str) -> None:
        super().check(term, form)
        if not getattr(term.target, "entropy", False):
            raise ValueError(f"estimator.kind: 'koleo' estimates the entropy of the prediction alone: it scores "
                             f"the 'entropy' target, not a {term.target.kind!r} one")

    def paired(self, pred, target, avail, temperature):
        return koleo(pred, self.cfg.eps)

    @classmethod
    def describe(cls, cfg: KoLeoCfg) -> str:
        return "KoLeo (Kozachenko–Leonenko entropy estimate)"
