"""The copies of the online network that a recipe's target encoders read: the one EMA teacher,
shared by every term whose encoder follows the online network, and the copies terms keep for
themselves (frozen models, read from their files)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .copies import CopiedEncoder, ema_momentum


class TargetCopies:
    """The copied target encoders of ``terms`` (a recipe's :class:`m3i.terms.Term` objects) around
    the online ``backbone``; ``ema``: the recipe's momentum schedule. ``teacher`` (None without an
    EMA term) and ``frozen`` (term name -> its own copy) are modules of the objective that owns
    this, under those names (a checkpoint's layout)."""

    def __init__(self, backbone: nn.Module, terms: Sequence[nn.Module], ema):
        self.online, self.terms, self.ema = backbone, terms, ema
        shared = [t for t in terms if _copies(t) and t.cfg.target_encoder.follows_online]
        # a head with no state of its own (a ``shared`` decoder, another term's head) has nothing to copy
        heads = {t.name: t.head_to_copy for t in shared if t.head_to_copy is not None and _has_state(t.head_to_copy)}
        self.teacher = CopiedEncoder(backbone, heads) if shared else None
        self.frozen = nn.ModuleDict({t.name: t.cfg.target_encoder.own_copy(t.name, backbone, t.head_to_copy)
                                     for t in terms if _copies(t) and not t.cfg.target_encoder.follows_online})
        # block outputs the copies return (data2vec's average of the top K)
        self.layers = max([getattr(t.cfg.target_encoder, "top_k", 0) for t in terms] + [0])

    def copy_of(self, term) -> CopiedEncoder:
        """The copied target encoder a term reads (the shared EMA teacher or its own model)."""
        return self.teacher if term.cfg.target_encoder.follows_online else self.frozen[term.name]

    def by_term(self) -> dict[str, CopiedEncoder]:
        """Term name -> its copied target encoder, for every term that reads one."""
        return {t.name: self.copy_of(t) for t in self.terms if _copies(t)}

    def encoders(self) -> list[nn.Module]:
        """The online backbone and the backbone of every copy."""
        nets = [self.online] + ([self.teacher.backbone] if self.teacher is not None else [])
        return nets + [f.backbone for f in self.frozen.values() if f.backbone not in nets]

    def online_heads(self) -> dict[str, nn.Module]:
        """The online heads the teacher keeps copies of, by term."""
        heads = self.teacher.heads if self.teacher is not None else {}
        return {t.name: t.head_to_copy for t in self.terms if t.name in heads}

    @torch.no_grad()
    def update(self, step: int, total_steps: int, skip: Tensor | None = None) -> float | None:
        """EMA step of the teacher after an optimiser step (none when the 0-d bool ``skip`` is
        true: a skipped step); returns the momentum of the schedule (None: no teacher)."""
        if self.teacher is None:
            return None
        m = ema_momentum(step, total_steps, self.ema.momentum, self.ema.end)
        self.teacher.update(self.online, self.online_heads(), m, skip)
        return m

    @torch.no_grad()
    def sync(self) -> None:
        """Make the teacher a copy of the online backbone and heads."""
        if self.teacher is not None:
            self.teacher.update(self.online, self.online_heads(), 0.0)


def _copies(term) -> bool:
    return term.cfg.target_encoder.copies_backbone


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())
