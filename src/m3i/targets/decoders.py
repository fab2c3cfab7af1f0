"""Decoders g_k: turn the encoder's output into a prediction ẑ of target k.

- ``MLPHead``: global projection / prediction heads on the pooled representation.
- ``DenseDecoder``: one decoder for every dense target. Visible tokens are embedded with
  their own positions (projector), then query tokens (a mask token plus the sin-cos
  embedding of where each target patch lies, relative to the source view) are predicted
  beside them (predictor). With queries at the masked patches of the same view it is MAE's
  pixel decoder / data2vec's regressor; with queries at every patch of the other view it is
  SIM's cross-view decoder (offset and scale encoded).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backbones.vit import Block
from ..views.relpos import sincos_embed


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


class DenseDecoder(nn.Module):
    def __init__(self, in_dim: int, width: int, projector_depth: int, depth: int, heads: int, out_dim: int):
        super().__init__()
        if width % 8:
            raise ValueError(f"decoder.width: {width} must be a multiple of 8 for the 4-part sin-cos position embedding")
        self.width = width
        self.embed = nn.Linear(in_dim, width)
        self.pos = nn.Linear(width, width)
        self.projector = nn.ModuleList(Block(width, heads, 4.0, 0.0) for _ in range(projector_depth))
        self.projector_norm = nn.LayerNorm(width, eps=1e-6) if projector_depth else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.predictor = nn.ModuleList(Block(width, heads, 4.0, 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.out = nn.Linear(width, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def position(self, pos: Tensor) -> Tensor:
        """(..., 4) positions (y, x, 10·log Δh, 10·log Δw) -> (..., width)."""
        return self.pos(sincos_embed(pos.float(), self.width).to(self.pos.weight.dtype))

    def project(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """Visible tokens (B, K, in_dim) at positions (B or 1, K, 4) -> (B, K, width).

        An EMA copy of this stage is the target head of SIM-style terms."""
        x = self.embed(tokens) + self.position(pos)
        for blk in self.projector:
            x = blk(x)
        return self.projector_norm(x)

    def predict(self, projected: Tensor, query_pos: Tensor) -> Tensor:
        """(B, K, width) context and (B, Q, 4) query positions -> (B, Q, out_dim) predictions."""
        q = self.mask_token + self.position(query_pos)
        q = q.expand(projected.shape[0], -1, -1)
        x = torch.cat([projected, q], dim=1)
        for blk in self.predictor:
            x = blk(x)
        return self.out(self.norm(x[:, projected.shape[1]:]))
