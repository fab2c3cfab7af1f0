"""The dense decoder g_k: one decoder for every dense target (a prediction per patch).

``DenseDecoder``: visible tokens are embedded with
  their own positions (projector), then query tokens (a mask token plus the sin-cos
  embedding of where each target patch lies, relative to the source view) are predicted
  beside them (predictor). With queries at the masked patches of the same view it is MAE's
  pixel decoder / data2vec's regressor; with queries at every patch of the other view it is
  SIM's cross-view decoder (offset and scale encoded). Options give SIM's own layout: the
  class token through projector and predictor, batch norm over tokens in the blocks, and
  positions added after the projector (so its EMA copy, the target head, adds none).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..layers import Block, TokenBatchNorm, layer_norm
from ..views.relpos import sincos_embed
from .base import DECODERS, DecoderCfg


def check_width(width: int, heads: int) -> None:
    """A dense decoder's width splits into its attention heads and into the 4-part sin-cos
    position embedding (a multiple of 8)."""
    if width % heads:
        raise ValueError(f"width: {width} is not divisible by heads={heads}")
    if width % 8:
        raise ValueError(f"width: {width} must be a multiple of 8 for the 4-part sin-cos position embedding")


_NORMS = {"layer": layer_norm, "batch": TokenBatchNorm}
_POSITIONS = ("embed", "after_projector")
_QUERIES = ("masked", "target_view")


class DenseDecoder(nn.Module):
    """Projector + predictor shared by the dense targets; K visible tokens, Q queries.

    Calls (``c`` = 1 with ``cls_token``, else 0):

    - ``project(tokens, pos, cls=None) -> (B, c + K, width)``: the visible tokens (B, K, in_dim)
      at positions ``pos`` (B or 1, K, 4), with the global token ``cls`` (B, in_dim) in front
      (given exactly when ``cls_token``; the backbone's ``Features.pooled``), embedded and run
      through the projector. An EMA copy of this stage is the target head of SIM-style terms;
      their target is ``patch_tokens(project(all_tokens, all_pos, cls=...))``.
    - ``predict(projected, query_pos, pos=None) -> (B, Q, out_dim)``: ``project``'s output and
      the query positions (B or 1, Q, 4); ``pos``, the positions given to ``project``, is needed
      with ``positions="after_projector"``. The predictor runs on the projected tokens and one
      mask token per query; the output is read at the queries (the class token is dropped).
    - ``patch_tokens(projected) -> (B, K, width)``: ``project``'s output without the class token.

    Options:

    - ``norm``: ``"layer"`` (LayerNorm, eps 1e-6) or ``"batch"`` (`TokenBatchNorm`: statistics
      over all tokens of the batch) in every block and in the final norms of the projector
      (``projector_norm``) and of the predictor (``norm``, over the query outputs).
    - ``positions``: ``"embed"`` adds a learned linear map (``pos``) of the sin-cos embedding
      (`sincos_embed`) to the embedded visible tokens before the projector, and to the mask
      tokens. ``"after_projector"``: ``project`` adds no positions (a target head built from it
      carries none); ``predict`` adds the fixed sin-cos embedding of each visible token's own
      position to the projected tokens, and the learned linear map of the sin-cos embedding to
      the mask tokens.
    - ``cls_token``: the global token goes through the same embedding, the projector and the
      predictor, at no position (nothing is added to it in either mode).
    """

    def __init__(self, in_dim: int, width: int, projector_depth: int, depth: int, heads: int, out_dim: int,
                 *, norm: str = "layer", positions: str = "embed", cls_token: bool = False, queries: str = "masked"):
        super().__init__()
        check_width(width, heads)
        if norm not in _NORMS:
            raise ValueError(f"decoder.norm: {norm!r} is not one of {', '.join(_NORMS)}")
        if positions not in _POSITIONS:
            raise ValueError(f"decoder.positions: {positions!r} is not one of {', '.join(_POSITIONS)}")
        if queries not in _QUERIES:
            raise ValueError(f"decoder.queries: {queries!r} is not one of {', '.join(_QUERIES)}")
        self.width, self.positions, self.cls_token, self.queries = width, positions, bool(cls_token), queries
        make_norm = _NORMS[norm]
        self.embed = nn.Linear(in_dim, width)
        self.pos = nn.Linear(width, width)
        self.projector = nn.ModuleList(Block(width, heads, 4.0, 0.0, make_norm) for _ in range(projector_depth))
        self.projector_norm = make_norm(width) if projector_depth else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.predictor = nn.ModuleList(Block(width, heads, 4.0, 0.0, make_norm) for _ in range(depth))
        self.norm = make_norm(width)
        self.out = nn.Linear(width, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def position(self, pos: Tensor) -> Tensor:
        """(..., 4) positions (y, x, 10·log Δh, 10·log Δw) -> (..., width), the learned map."""
        return self.pos(sincos_embed(pos.float(), self.width).to(self.pos.weight.dtype))

    def project(self, tokens: Tensor, pos: Tensor, cls: Tensor | None = None) -> Tensor:
        """Visible tokens (B, K, in_dim) at positions (B or 1, K, 4), class token (B, in_dim)
        exactly when ``cls_token`` -> (B, c + K, width), the class token first."""
        if (cls is not None) != self.cls_token:
            raise ValueError("DenseDecoder.project: pass the pooled features as `cls` exactly when the decoder "
                             f"was built with cls_token=True (it was built with cls_token={self.cls_token})")
        x = self.embed(tokens)
        if self.positions == "embed":
            x = x + self.position(pos)
        if cls is not None:
            x = torch.cat([self.embed(cls).unsqueeze(1), x], dim=1)
        for blk in self.projector:
            x = blk(x)
        return self.projector_norm(x)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def patch_tokens(self, projected: Tensor) -> Tensor:
        """``project``'s output without the class token: (B, K, width)."""
        return projected[:, int(self.cls_token):]

    def predict(self, projected: Tensor, query_pos: Tensor, pos: Tensor | None = None) -> Tensor:
        """(B, c + K, width) context, (B or 1, Q, 4) query positions and, for
        ``positions="after_projector"``, the context's (B or 1, K, 4) positions -> (B, Q, out_dim)."""
        if self.positions == "after_projector":
            if pos is None:
                raise ValueError("DenseDecoder.predict: positions='after_projector' needs `pos`, the positions "
                                 "of the projected visible tokens")
            c = int(self.cls_token)
            fixed = sincos_embed(pos.float(), self.width).to(projected.dtype)
            projected = torch.cat([projected[:, :c], projected[:, c:] + fixed], dim=1)
        q = self.mask_token + self.position(query_pos)
        q = q.expand(projected.shape[0], -1, -1)
        x = torch.cat([projected, q], dim=1)
        for blk in self.predictor:
            x = blk(x)
        return self.out(self.norm(x[:, projected.shape[1]:]))


@DECODERS.register
class DenseDecoderCfg(DecoderCfg):
    """Visible tokens embedded to ``width``, ``projector_depth`` blocks on them, then ``depth``
    predictor blocks beside the query tokens (at the masked patches of the same view, or at every
    patch of the target view)."""

    kind: Literal["dense"]
    forms: ClassVar[frozenset[str]] = frozenset({"dense"})
    width: int = 128
    projector_depth: int = Field(0, ge=0)
    depth: int = Field(2, ge=0)
    heads: int = Field(4, ge=1)
    queries: Literal["masked", "target_view"] = "masked"
    # SIM's layout (its official defaults: batch, after_projector, true)
    norm: Literal["layer", "batch"] = "layer"   # in the blocks and the final norms
    positions: Literal["embed", "after_projector"] = "embed"
    cls_token: bool = False  # the pooled token (the ViT's class token) through projector and predictor

    @model_validator(mode="after")
    def _shape(self):
        check_width(self.width, self.heads)
        return self

    def build(self, in_dim: int, out_dim: int) -> dict[str, nn.Module]:
        return {"decoder": DenseDecoder(in_dim, self.width, self.projector_depth, self.depth, self.heads, out_dim,
                                        norm=self.norm, positions=self.positions, cls_token=self.cls_token,
                                        queries=self.queries)}

    def width_of(self, in_dim: int, out_dim: int | None) -> int:
        return out_dim

