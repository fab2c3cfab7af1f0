"""What every estimator of a mutual-information term answers to."""
from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ..registry import Registry
from ..schema import Strict

# the three shapes a target takes, as an estimator sees them
FORMS = {
    "classes": "a category scored against the table of every class",
    "paired": "one global target per image",
    "dense": "a target per patch",
}


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
                temperature: Tensor, count: int) -> Tensor:
        """pred (R, D) of this rank's R labelled rows; cand (C, D); positive (R,); ``count``: labelled
        rows over every rank."""
        raise NotImplementedError

    def paired(self, pred: Tensor, target: Tensor, avail: Tensor | None, temperature: Tensor) -> Tensor:
        """pred, target (B, D), row i's target is target[i]; avail (B,) bool: the rows that carry
        one (None: every row, and no host sync to find them)."""
        raise NotImplementedError

    def dense(self, pred: Tensor, target: Tensor) -> Tensor:
        """pred, target (N, D): one row per predicted patch."""
        raise NotImplementedError

    @classmethod
    def describe(cls, cfg: EstimatorCfg) -> str:
        """The estimator in the words of the special-case table."""
        raise NotImplementedError


ESTIMATORS: Registry[type[Estimator]] = Registry("estimator")
