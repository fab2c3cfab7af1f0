"""The text decoder g_k of a captioning target: a small transformer that predicts a caption's
tokens from the image's tokens (CoCa's multimodal decoder, CapPa's decoder).

Each block is pre-norm causal self-attention over the caption's tokens, cross-attention to the
image's tokens (the online backbone's ``Features``: its pooled token, then its patch tokens,
brought to the decoder's width), and an MLP. Under teacher forcing the input at position i is the
caption's token i − 1 ([CLS] first) and the output there predicts token i. A row predicted in
parallel (CapPa) reads a learned mask token at every position instead, attending to all of them:
it predicts every token at once. The output layer over the vocabulary (``head``) starts at zero,
as CapPa's: the first predictions are uniform.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..layers import Attention, Mlp, layer_norm
from .base import DECODERS, DecoderCfg


class CrossAttention(nn.Module):
    """Multi-head attention of queries x (B, L, D) to a context (B, K, D)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu" and q.dtype == torch.bfloat16:  # as layers.Attention: the CPU's fp32 kernel
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DecoderBlock(nn.Module):
    """Self-attention (masked), cross-attention to the image, MLP; each pre-norm and residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = layer_norm(dim), Attention(dim, num_heads)
        self.norm2, self.cross = layer_norm(dim), CrossAttention(dim, num_heads)
        self.norm3, self.mlp = layer_norm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor, attn_mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        x = x + self.cross(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


class TextDecoder(nn.Module):
    """Caption tokens (B, L) and the image's tokens (B, K, in_dim) -> (B, L, width), normed;
    ``head`` (width -> vocab) turns them into the logits of the next token.

    ``forward(ids, context, parallel=None)``: ``parallel`` (B,) bool marks the rows predicted in
    parallel (their ids are not read). Up to ``positions`` tokens."""

    def __init__(self, in_dim: int, vocab: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 positions: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"decoder.width: {width} is not divisible by decoder.heads={heads}")
        self.positions = positions
        self.context = nn.Sequential(layer_norm(in_dim), nn.Linear(in_dim, width))
        self.embed = nn.Embedding(vocab, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(DecoderBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = layer_norm(width)
        self.head = nn.Linear(width, vocab)
        nn.init.trunc_normal_(self.embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.01)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "mask_token"}

    def forward(self, ids: Tensor, context: Tensor, parallel: Tensor | None = None) -> Tensor:
        b, n = ids.shape
        if n > self.positions:
            raise ValueError(f"TextDecoder: {n} tokens, more than its {self.positions} positions (decoder.max_length)")
        x = self.embed(ids)
        attn_mask = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()[None, None]  # causal
        if parallel is not None:  # every position a mask token, each attending to all of them
            x = torch.where(parallel.view(b, 1, 1), self.mask_token.to(x.dtype), x)
            attn_mask = attn_mask | parallel.view(b, 1, 1, 1)
        x = x + self.pos_embed[:, :n]
        ctx = self.context(context)
        for blk in self.blocks:
            x = blk(x, ctx, attn_mask)
        return self.norm(x)


@DECODERS.register
class TextDecoderCfg(DecoderCfg):
    """A text decoder over a target's vocabulary (the captioning target's tokenizer)."""

    kind: Literal["text"]
    forms: ClassVar[frozenset[str]] = frozenset({"tokens"})
    width: int = Field(256, ge=1)
    depth: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    # tokens per caption, [CLS] and [SEP] included (as the text towers count them): longer ones are
    # cut; the decoder reads and predicts max_length − 1 of them
    max_length: int = Field(16, ge=2)

    def build(self, in_dim: int, out_dim: int | None = None) -> dict[str, nn.Module]:
        if out_dim is None:
            raise ValueError("decoder.kind: a 'text' decoder predicts a vocabulary's tokens; its target must name "
                             "one (the 'captioning' target)")
        return {"decoder": TextDecoder(in_dim, out_dim, self.width, self.depth, self.heads, self.mlp_ratio,
                                       self.max_length - 1)}

    def width_of(self, in_dim: int, out_dim: int | None = None) -> int:
        return self.width
