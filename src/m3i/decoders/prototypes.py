"""The prototype head g_k of self-distillation (DINO, iBOT): an MLP to a bottleneck, L2-normalised,
then scored against K learned prototypes by a weight-normalised linear layer without bias. The
scores are the logits of a distribution over the prototypes, the student's prediction ẑ; the
teacher reads its EMA copy of the same head (``target_encoder: {kind: centred_ema}``).

It takes pooled features (B, D) for the image-level target and patch tokens (B, M, D) for the
patch-level one. A patch-level term may read another term's head instead of its own
(``decoder: {kind: shared, term: NAME}``: DINOv2's ``ibot.separate_head: false``).
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from .base import DECODERS, DecoderCfg
from .mlp import MLPHead


class PrototypeHead(nn.Module):
    """(..., in_dim) -> (..., prototypes) scores: ``mlp`` (Linear layers with GELU between, the last
    to ``bottleneck``), L2 normalisation, then the cosine to each prototype (each row of
    ``prototypes`` normalised), times a learned per-prototype ``scale`` unless ``norm_last_layer``.

    ``freeze_steps``: the prototypes (and their scale) get no gradient until the step counter
    ``step`` (set after every optimiser step, :meth:`after_step`) reaches it; decided on the device,
    in the forward pass, so no hook and no read by the host (DINO's ``freeze_last_layer``)."""

    def __init__(self, in_dim: int, hidden: list[int], bottleneck: int, prototypes: int,
                 norm_last_layer: bool = True, freeze_steps: int = 0):
        super().__init__()
        self.mlp = MLPHead(in_dim, [*hidden, bottleneck])
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        self.scale = None if norm_last_layer else nn.Parameter(torch.ones(prototypes))
        self.freeze_steps = freeze_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.mlp.modules():  # DINO's initialisation of its head's MLP
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.kaiming_uniform_(self.prototypes, a=math.sqrt(5))  # a linear layer's: only the directions count

    def weight(self) -> Tensor:
        """(K, bottleneck): each prototype as the last layer scores with it."""
        w = F.normalize(self.prototypes, dim=-1)
        if self.scale is not None:
            w = w * self.scale.unsqueeze(-1)
        if self.freeze_steps:  # the same value; its gradient times 0 while frozen
            live = (self.step >= self.freeze_steps).to(w.dtype)
            w = w.detach() + (w - w.detach()) * live
        return w

    def embed(self, x: Tensor) -> Tensor:
        """(..., in_dim) -> (..., bottleneck), L2-normalised."""
        x = self.mlp(x)
        return F.normalize(x, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) -> (..., K) prototype scores."""
        return F.linear(self.embed(x), self.weight())

    def after_step(self, step: int) -> None:
        """``step`` optimiser steps are done (a write to the device, nothing read back)."""
        self.step.fill_(step)


@DECODERS.register
class PrototypesCfg(DecoderCfg):
    """DINO's head: ``hidden`` widths (GELU between), a ``bottleneck``, then ``prototypes`` K."""

    kind: Literal["prototypes"]
    forms: ClassVar[frozenset[str]] = frozenset({"paired", "dense"})
    hidden: list[PositiveInt] = Field(default_factory=lambda: [2048, 2048])
    bottleneck: PositiveInt = 256
    prototypes: PositiveInt = 65536
    # the prototypes' norms fixed at 1 (DINO's norm_last_layer); false: a learned scale per prototype
    norm_last_layer: bool = True
    # optimiser steps during which the prototypes keep their initial weights (DINO: the first epoch)
    freeze_last_layer: int = Field(0, ge=0)

    def build(self, in_dim: int, out_dim: int | None = None) -> dict[str, nn.Module]:
        head = PrototypeHead(in_dim, self.hidden, self.bottleneck, self.prototypes, self.norm_last_layer,
                             self.freeze_last_layer)
        return {"decoder": head, "predictor": nn.Identity()}

    def width_of(self, in_dim: int, out_dim: int | None = None) -> int:
        return self.prototypes


class SharedHead(nn.Module):
    """The decoder of a term that reads another term's prototype head: no weights of its own, so a
    checkpoint, the optimiser and the teacher see the head once, under the term that owns it. The
    term's target reads the owner's head (:func:`link_shared_heads` tells it which)."""

    def __init__(self, owner: str):
        super().__init__()
        self.owner_name = owner

    def forward(self, x: Tensor) -> Tensor:
        raise TypeError(f"the head of term {self.owner_name!r} is read through the target that shares it")


@DECODERS.register
class SharedCfg(DecoderCfg):
    """The prototype head of term ``term`` (DINOv2's iBOT head shared with DINO's)."""

    kind: Literal["shared"]
    forms: ClassVar[frozenset[str]] = frozenset({"paired", "dense"})
    term: str

    def build(self, in_dim: int, out_dim: int | None = None) -> dict[str, nn.Module]:
        return {"decoder": SharedHead(self.term)}

    def width_of(self, in_dim: int, out_dim: int | None = None) -> int:
        return out_dim or in_dim  # the owner's (not known here)


def shared_width(cfg, cfgs) -> int | None:
    """The width of the head a ``shared`` decoder of term ``cfg`` reads (its owner's prototypes K),
    among the recipe's terms ``cfgs`` (TermCfg objects); None for another decoder. Raise ValueError,
    naming the field, when no other term of the recipe has a prototype head of that name."""
    if not isinstance(cfg.decoder, SharedCfg):
        return None
    owner = next((c for c in cfgs if c.name == cfg.decoder.term and c is not cfg), None)
    where = f"terms.{cfg.name}.decoder.term"
    if owner is None:
        others = ", ".join(repr(c.name) for c in cfgs if c is not cfg) or "none"
        raise ValueError(f"{where}: {cfg.decoder.term!r} is not another term of the recipe (others: {others})")
    if not isinstance(owner.decoder, PrototypesCfg):
        raise ValueError(f"{where}: term {owner.name!r} has no prototype head to share (its decoder is "
                         f"{owner.decoder.kind!r}, not 'prototypes')")
    return owner.decoder.prototypes


def link_shared_heads(terms) -> None:
    """Tell the target of every term of ``terms`` (a recipe's built :class:`m3i.terms.Term` objects)
    whose decoder is ``shared`` which term owns the head it reads (its ``head_owner``; the owner
    checked by :func:`shared_width`). Raise ValueError, naming the field, for a target kind that
    reads no shared head, or when the teacher keeps no copy of the owner's head."""
    by_name = {t.name: t for t in terms}
    for t in terms:
        if not isinstance(t.decoder, SharedHead):
            continue
        owner = by_name[t.decoder.owner_name]
        if not hasattr(t.target, "head_owner"):
            raise ValueError(f"terms.{t.name}.decoder.kind: a {t.cfg.target.kind!r} target reads no shared head; "
                             f"'shared' is for the targets over prototypes (distill, dense_distill)")
        if owner.head_to_copy is None and t.cfg.target_encoder.copies_backbone:
            raise ValueError(f"terms.{t.name}.decoder.term: the teacher keeps no copy of term {owner.name!r}'s "
                             f"head; give that term a target encoder that passes it (centred_ema)")
        t.target.head_owner = owner
