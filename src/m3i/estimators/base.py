"""What every estimator of a mutual-information term answers to."""
from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor

from ..registry import Registry
from ..schema import Strict

# the three shapes a target takes, as an estimator sees them
FORMS = {
    "classes": "a category scored against the table of every class",
    "paired": "one global target per image",
    "dense": "a target per patch",
    "tokens": "a caption's tokens, each scored against every token of the vocabulary",
}


def in_fp32(fn):
    """Run an estimator function in float32 with autocast off: its floating tensor arguments are
    cast up, and no matmul inside is cast back down to bf16 (autocast casts a matmul's inputs
    whatever ``.float()`` said), nor is an all-reduce of its statistics."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        up = lambda a: a.float() if isinstance(a, Tensor) and a.is_floating_point() else a  # noqa: E731
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})

    return wrapped


class EstimatorCfg(Strict):
    kind: str


class Estimator:
    """An estimator of I(ẑ; z): turns predictions and targets into the negative bound to minimise.

    ``forms`` lists the shapes of target it scores (:data:`FORMS`); a term calls the method of its
    target's form. Each returns this rank's share of the loss: with DDP's mean over ranks the
    result is the loss of the global batch.
    """

    kind: ClassVar[str]
    Config: ClassVar[type[EstimatorCfg]]
    forms: ClassVar[frozenset[str]] = frozenset()
    uses_temperature: ClassVar[bool] = False  # the term keeps a (learnable) temperature for it
    # p̂(z | ẑ) is normalised over the batch's candidates: a row without its target is left out of
    # both sides at a fixed shape (rather than weighed 0 in a mean)
    contrastive: ClassVar[bool] = False

    def __init__(self, cfg: EstimatorCfg):
        self.cfg = cfg

    @classmethod
    def check(cls, term, form: str) -> None:
        """Raise ValueError (naming the field) when this estimator, with ``term.estimator``'s
        settings, cannot score the term's target (a TermCfg), whose shape is ``form``."""
        target = term.target.kind
        if form not in cls.forms:
            able = [e.kind for e in ESTIMATORS if form in e.forms]
            raise ValueError(f"estimator.kind: a {target!r} target is {FORMS[form]}; it takes "
                             f"{' or '.join(repr(k) for k in able)}, got {cls.kind!r}")

    def classes(self, pred: Tensor, cand: Tensor, bias: Tensor | None, positive: Tensor,
                labelled: Tensor, temperature: Tensor) -> Tensor:
        """pred (B, D); cand (C, D); positive (B,) class of each row (any valid class where the row
        has none); labelled (B,) bool: the rows that carry a label, the only ones that count."""
        raise NotImplementedError

    def paired(self, pred: Tensor, target: Tensor, avail: Tensor | None, temperature: Tensor) -> Tensor:
        """pred, target (B, D), row i's target is target[i]; avail (B,) bool: the rows that carry
        one (None: every row, and no host sync to find them)."""
        raise NotImplementedError

    def dense(self, pred: Tensor, target: Tensor) -> Tensor:
        """pred, target (N, D): one row per predicted patch."""
        raise NotImplementedError

    def own(self, share=lambda x: x) -> dict[str, Tensor]:
        """The estimator's own learned values (a sigmoid's bias), each read through ``share`` (see
        ``Target.score``), passed to its loss methods by name; an estimator that learns any is an
        ``nn.Module``, its parameters the term's."""
        return {}

    @classmethod
    def describe(cls, cfg: EstimatorCfg) -> str:
        """The estimator in the words of the special-case table."""
        raise NotImplementedError


ESTIMATORS: Registry[type[Estimator]] = Registry("estimator")
