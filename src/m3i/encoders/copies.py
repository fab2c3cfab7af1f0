"""Target encoders that read image views with a backbone: the online backbone itself, its EMA copy
(BYOL, MoCo v3, SIM, data2vec) or a frozen pre-trained model; the copies, and the normalisation
of their dense outputs."""
from __future__ import annotations

import copy
import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..backbones import BackboneCfg, build_backbone
from ..weights import load_weights_into
from .base import TARGET_ENCODERS, TargetEncoderCfg


class FeatureTargetCfg(TargetEncoderCfg):
    """An encoder of image views: the online backbone, its EMA copy or a frozen model."""

    # dense targets: the average of the top-K block outputs (data2vec), and their normalisation
    top_k: int = Field(0, ge=0)
    norm: Literal["none", "layer", "instance"] = "none"

    def _layers(self) -> str:
        return f", top-{self.top_k} layers" if self.top_k else ""


@TARGET_ENCODERS.register
class EMAEncoderCfg(FeatureTargetCfg):
    kind: Literal["ema"]
    copies_backbone: ClassVar[bool] = True
    follows_online: ClassVar[bool] = True
    head: bool = False  # the target also passes the EMA copy of the term's projector

    def describe(self) -> str:
        return "EMA encoder" + (" + projector" if self.head else "") + self._layers()


@TARGET_ENCODERS.register
class OnlineEncoderCfg(FeatureTargetCfg):
    kind: Literal["online"]
    # stop the gradient through the target (SimSiam); a Gaussian estimate needs it
    stop_gradient: bool = False

    def describe(self) -> str:
        return "the same encoder" + (" (stop-gradient)" if self.stop_gradient else "")

    def online_with_gradient(self) -> bool:
        return not self.stop_gradient


@TARGET_ENCODERS.register
class FrozenEncoderCfg(FeatureTargetCfg):
    kind: Literal["frozen"]
    copies_backbone: ClassVar[bool] = True
    head: bool = False
    weights: str  # a safetensors file, m3i's or timm's layout
    backbone: BackboneCfg | None = None  # another architecture than the online one

    def describe(self) -> str:
        return "frozen model" + self._layers()

    def own_copy(self, term: str, backbone: nn.Module, head: nn.Module | None) -> CopiedEncoder:
        """A backbone (the online one's architecture, or ``backbone`` here) with the weights of
        ``weights``, in m3i's or timm's layout; a checkpoint leaves it out (it comes from its file)."""
        from safetensors.torch import load_file

        net = build_backbone(self.backbone.name, **self.backbone.kwargs()) if self.backbone else backbone
        copy_ = CopiedEncoder(net, {term: head} if head is not None else {}, saved=False)
        try:
            state = load_file(self.weights)
        except (OSError, Exception) as e:  # safetensors raises its own error type for corrupt files
            raise ValueError(f"terms.{term}.target_encoder.weights: cannot read {self.weights}: {e}") from None
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
        load_weights_into(copy_.backbone, state, f"terms.{term}.target_encoder.weights {self.weights}",
                          optional_prefixes=("mask_token",))
        return copy_


def dense_target_norm(tokens: Tensor, kind: str) -> Tensor:
    """(B, N, D) -> normalised target tokens: 'layer' (LayerNorm without affine), 'instance'
    (each channel over the tokens of an image), or 'none'."""
    if kind == "layer":
        return F.layer_norm(tokens.float(), tokens.shape[-1:])
    if kind == "instance":
        return F.instance_norm(tokens.float().transpose(1, 2)).transpose(1, 2)
    return tokens


def top_k_average(layers: list[Tensor], norm: str) -> Tensor:
    """data2vec's target: the average of the top-K block outputs, each normalised first."""
    return torch.stack([dense_target_norm(t, norm) for t in layers]).mean(0)


def _local(x: torch.Tensor) -> torch.Tensor:
    """A tensor's own part: the local shard of a sharded (DTensor) parameter, else itself."""
    return x.to_local() if hasattr(x, "to_local") else x


class CopiedEncoder(nn.Module):
    """A target encoder that copies the online network: the EMA teacher (updated by momentum) or a
    frozen model.

    Holds a copy of the backbone and, per term, a copy of the term's online head (its projector)
    that the term's target runs through. No gradient ever reaches it. ``saved=False``: a checkpoint
    leaves it out (a frozen model, read from its own file).
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], saved: bool = True):
        from ..layers import DropPath

        super().__init__()
        self.saved = saved
        self.backbone = copy.deepcopy(backbone)
        self.heads = nn.ModuleDict({k: copy.deepcopy(v) for k, v in heads.items()})
        # the target is the whole network, the same in train and eval mode: no stochastic depth
        # (batch norm keeps following the mode: BYOL's target normalises with batch statistics)
        for m in self.modules():
            if isinstance(m, DropPath):
                m.p = 0.0
        self.requires_grad_(False)

    def unsaved_state_keys(self) -> set[str]:
        """Keys of ``state_dict()`` that a checkpoint leaves out: all of them, or none."""
        return set() if self.saved else set(self.state_dict())

    @torch.no_grad()
    def update(self, backbone: nn.Module, heads: dict[str, nn.Module], momentum: float,
               skip: torch.Tensor | None = None) -> None:
        """φ ← m·φ + (1 − m)·θ for every parameter; buffers are copied. ``skip``: a 0-d bool
        tensor; when true nothing changes (decided on the device, no wait for it)."""
        pairs = [(self.backbone, backbone)] + [(self.heads[k], heads[k]) for k in self.heads]
        weight = 1.0 - momentum if skip is None else (1.0 - momentum) * (~skip).float()
        for mine, online in pairs:  # sharded (FSDP) alike: each rank updates its own shards
            t_params = [_local(p.data) for p in mine.parameters()]
            o_params = [_local(p.detach()) for p in online.parameters()]
            if skip is None:
                torch._foreach_lerp_(t_params, o_params, weight)
            else:  # φ += w·(θ − φ), w a 0-d device tensor: multi-tensor kernels, no read by the host
                delta = torch._foreach_sub(o_params, t_params)
                torch._foreach_mul_(delta, weight)
                torch._foreach_add_(t_params, delta)
            for tb, ob in zip(mine.buffers(), online.buffers()):
                tb.copy_(ob if skip is None else torch.where(skip, tb, ob))


def ema_momentum(step: int, total: int, start: float, end: float) -> float:
    """Cosine schedule from ``start`` to ``end`` over the run (BYOL, SIM)."""
    if total <= 1:
        return end
    return end - (end - start) * (math.cos(math.pi * min(step, total) / total) + 1) / 2
