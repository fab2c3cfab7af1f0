"""The class table: learned category embeddings, the target encoder of the label target."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TARGET_ENCODERS, TargetEncoderCfg


@TARGET_ENCODERS.register
class ClassTableCfg(TargetEncoderCfg):
    """Learned category embeddings."""

    kind: Literal["class_table"]
    normalize: bool = True
    bias: bool = False

    def describe(self) -> str:
        return "learned class embeddings"


class ClassTable(nn.Module):
    """Learned category embeddings: the Boltzmann candidates of a label target.

    With ``normalize=False`` and ``bias=True`` the Boltzmann estimate is exactly the
    cross-entropy of a linear classifier.
    """

    def __init__(self, num_classes: int, dim: int, normalize: bool = True, bias: bool = False):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a label target needs at least one class in the data, got {num_classes}")
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None
        self.normalize = normalize

    def forward(self) -> tuple[Tensor, Tensor | None]:
        """-> candidates (C, dim), log-prior (C,) or None."""
        w = F.normalize(self.weight, dim=-1) if self.normalize else self.weight
        return w, self.bias
