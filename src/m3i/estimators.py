"""Estimators of the variational bound I(ẑ; z) ≥ H(z) + E[log p̂(z | ẑ)].

Each is a pure function of (prediction, target, candidates) returning the negative bound
term to minimise. The family of p̂ picks the loss:
- Boltzmann  p̂ = exp(ẑ·z/τ) / Σ_{z'∈Z} exp(ẑ·z'/τ)  → softmax cross-entropy over Z
- Gaussian   p̂ ∝ exp(−‖ẑ − z‖² / 2σ²)               → squared error
- UniGrad    SIM's dense form: squared error plus a correlation penalty that plays the
             role of the Boltzmann denominator for dense targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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


def gaussian(pred: Tensor, target: Tensor, normalize: bool = False, reduce: str = "mean") -> Tensor:
    """Squared error −log p̂ of a Gaussian p̂ (up to constants), averaged over rows.

    pred, target: (..., D). normalize: compare unit vectors (‖a − b‖² = 2 − 2cos, BYOL).
    reduce: "mean" averages over D (MSE), "sum" sums over D.
    """
    pred, target = pred.float(), target.float()
    if normalize:
        pred, target = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    err = (pred - target).pow(2)
    err = err.mean(-1) if reduce == "mean" else err.sum(-1)
    return err.mean()


def unigrad(pred: Tensor, target: Tensor, lam: float = 0.02, correlation: Tensor | None = None) -> Tensor:
    """SIM's UniGrad dense loss over N target tokens.

    pred, target: (N, D). correlation: (D, D) = mean(t tᵀ) over the tokens of every rank;
    computed from ``target`` when not given.
    L = (mean‖p − t‖² + λ · mean(pᵀ C p)) / D
    """
    pred, target = pred.float(), target.float()
    if correlation is None:
        correlation = target.t() @ target / max(target.shape[0], 1)
    pos = (pred - target).pow(2).sum(-1).mean()
    neg = ((pred @ correlation) * pred).sum(-1).mean()
    return (pos + lam * neg) / pred.shape[-1]


def target_correlation(target: Tensor) -> Tensor:
    """mean(t tᵀ) over tokens, averaged across ranks when torch.distributed is running. target: (N, D)."""
    target = target.float()
    total = target.t() @ target
    count = torch.tensor(float(target.shape[0]), device=target.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    return total / count.clamp_min(1.0)


ESTIMATORS = ("boltzmann", "gaussian", "unigrad")
