"""The global decoder g_k: an MLP projector and an optional MLP predictor on the pooled
representation (a prediction per image: the category, the caption, another view's embedding)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, PositiveInt
from torch import Tensor, nn

from .base import DECODERS, DecoderCfg


class MLPHead(nn.Module):
    """Linear layers with norm and GELU between them; ``dims`` lists each layer's width.

    ``dims=[]`` is the identity (a linear classifier on the pooled features)."""

    def __init__(self, in_dim: int, dims: list[int], norm: str = "none"):
        super().__init__()
        layers: list[nn.Module] = []
        for i, d in enumerate(dims):
            layers.append(nn.Linear(in_dim, d))
            if i < len(dims) - 1:
                if norm == "batch":
                    layers.append(nn.BatchNorm1d(d))
                elif norm == "layer":
                    layers.append(nn.LayerNorm(d))
                layers.append(nn.GELU())
            in_dim = d
        self.net = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        return self.net(x)



@DECODERS.register
class GlobalDecoderCfg(DecoderCfg):
    """An MLP projector (``projector``: each layer's width, the last the output) and an optional
    MLP predictor on the pooled representation."""

    kind: Literal["global"] = "global"
    forms: ClassVar[frozenset[str]] = frozenset({"classes", "paired"})
    projector: list[PositiveInt] = Field(default_factory=lambda: [128])
    predictor: list[PositiveInt] = Field(default_factory=list)
    norm: Literal["batch", "layer", "none"] = "none"

    def build(self, in_dim: int, out_dim: int | None = None) -> dict[str, nn.Module]:
        decoder = MLPHead(in_dim, self.projector, self.norm)
        return {"decoder": decoder, "predictor": MLPHead(decoder.out_dim, self.predictor, self.norm)}

    def width_of(self, in_dim: int, out_dim: int | None = None) -> int:
        return ([in_dim] + self.projector + self.predictor)[-1]
