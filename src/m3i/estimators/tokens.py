"""Token estimator: −log p̂(caption | image), token by token, with p̂ a softmax over the vocabulary
at each position (the Boltzmann estimator whose candidates are the vocabulary's tokens, read off
the decoder's output table). A generative bound on I(image; text): CoCa's and CapPa's captioning
loss, the token cross-entropy.

The loss is the mean over every token the global batch predicts (the caption's tokens and its
end, not the padding), as CapPa normalises it; samples without a caption predict no token, at a
fixed shape.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .. import distributed as dist
from .base import ESTIMATORS, Estimator, EstimatorCfg, in_fp32


@in_fp32
def token_cross_entropy(pred: Tensor, table: Tensor, bias: Tensor | None, target: Tensor, weights: Tensor,
                        label_smoothing: float = 0.0) -> Tensor:
    """This rank's share of the mean token cross-entropy over the global batch, in float32.

    pred (R, D): the decoder's output at each of this rank's R token positions; table (V, D) and
    bias (V,): the output layer over the vocabulary; target (R,): the token to predict at each
    position; weights (R,) bool: the positions that count. -> Σ −log p̂(target | pred) over the
    counted positions, divided by the global count over the number of ranks."""
    logits = pred @ table.t()
    if bias is not None:
        logits = logits + bias
    loss = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    count = dist.gather(weights.long()).sum().clamp(min=1)
    return (loss * weights.to(loss.dtype)).sum() * dist.world_size() / count


class TokensCfg(EstimatorCfg):
    kind: Literal["tokens"]
    # the target's share spread over the vocabulary (0: none, as CoCa and CapPa train)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


@ESTIMATORS.register
class Tokens(Estimator):
    kind = "tokens"
    Config = TokensCfg
    forms = frozenset({"tokens"})

    def tokens(self, pred: Tensor, table: Tensor, bias: Tensor | None, target: Tensor, weights: Tensor) -> Tensor:
        """pred (R, D) at every token position; table (V, D) and bias (V,): the vocabulary's
        output layer; target (R,) token ids; weights (R,) bool: the positions that count."""
        return token_cross_entropy(pred, table, bias, target, weights, self.cfg.label_smoothing)

    @classmethod
    def describe(cls, cfg: TokensCfg) -> str:
        return "token cross-entropy (Boltzmann over the vocabulary)"
