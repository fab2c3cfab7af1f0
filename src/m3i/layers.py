"""Layers shared by the backbones, the decoders and the text tower: the pre-norm transformer
block with its attention and MLP, stochastic depth, and the two norms a block can use."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional boolean mask."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, L, head_dim)
        # attn_mask: (B, 1, L, L) bool, True = may attend; broadcast over heads
        if x.device.type == "cpu" and q.dtype == torch.bfloat16:
            # the CPU's fused bf16 attention kernel runs ~3.6x slower than its fp32 one
            # (benchmarks/attention_cpu.py); attend in fp32 there, everything else stays bf16
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def layer_norm(dim: int) -> nn.LayerNorm:
    """The transformer's norm: LayerNorm over the channels of each token, eps 1e-6."""
    return nn.LayerNorm(dim, eps=1e-6)


class TokenBatchNorm(nn.Module):
    """Batch norm over tokens: (B, L, D) -> (B, L, D), each channel normalised with the mean and
    variance over all B·L tokens in training (running averages in eval), then scaled and shifted.

    The statistics are computed in the parameters' precision (float32 under bf16 autocast). The
    ``BatchNorm1d`` it holds (``bn``) sees (B, D, L), so turning a model's batch norms global
    (``m3i.train.strategy.global_batch_norm``) covers it too."""

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.bn(x.transpose(1, 2).to(self.bn.weight.dtype)).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block; ``norm(dim)`` builds its two norms (default `layer_norm`)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float,
                 norm: Callable[[int], nn.Module] = layer_norm):
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def no_weight_decay(module: nn.Module) -> set[str]:
    """Full names of the parameters that the submodules of ``module`` exempt from weight decay
    through their own ``no_weight_decay()`` (tokens, position tables)."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        own = getattr(sub, "no_weight_decay", None)
        if callable(own):
            names |= {f"{prefix}.{k}" if prefix else k for k in own()}
    return names


def running_stats(module: nn.Module) -> list[Tensor]:
    """The batch-norm running statistics under ``module`` (what a forward pass in training moves)."""
    return [b for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
