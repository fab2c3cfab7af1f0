"""What every kind of target encoder f_φ answers to: its settings, picked by ``kind``."""
from __future__ import annotations

from typing import ClassVar

from ..registry import Registry
from ..schema import Strict


class TargetEncoderCfg(Strict):
    """The settings of a target encoder, registered with ``@TARGET_ENCODERS.register``; a target
    kind names the encoder kinds it can be read with (``Target.encoders``)."""

    kind: str
    # a copy of the online backbone (and of the term's head) that the objective keeps
    copies_backbone: ClassVar[bool] = False
    # that copy follows the online network by momentum: one copy, the EMA teacher, shared by every
    # term whose encoder follows it; a copy that does not is the term's own (:meth:`own_copy`)
    follows_online: ClassVar[bool] = False

    def online_with_gradient(self) -> bool:
        """Whether the target is the online network's own output, gradient included (it can then
        collapse onto the prediction)."""
        return False

    def own_copy(self, term: str, backbone, head):
        """The copied encoder (``m3i.encoders.copies.CopiedEncoder``) that term ``term`` keeps for
        itself, from the online ``backbone`` and the term's ``head`` (None: no head copied)."""
        raise NotImplementedError

    def describe(self) -> str:
        """The target encoder in the words of the special-case table."""
        raise NotImplementedError


TARGET_ENCODERS: Registry[type[TargetEncoderCfg]] = Registry("target encoder kind")
