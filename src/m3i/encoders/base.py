"""What every kind of target encoder f_φ answers to: its settings, picked by ``kind``."""
from __future__ import annotations

from typing import ClassVar

from ..registry import Registry
from ..schema import Strict


class TargetEncoderCfg(Strict):
    """The settings of a target encoder, registered with ``@TARGET_ENCODERS.register``; a target
    kind names the encoder kinds it can be read with (``Target.encoders``)."""

    kind: str
    # a copy of the online backbone (and of the term's head) that the objective keeps and updates
    copies_backbone: ClassVar[bool] = False

    def describe(self) -> str:
        """The target encoder in the words of the special-case table."""
        raise NotImplementedError


TARGET_ENCODERS: Registry[type[TargetEncoderCfg]] = Registry("target encoder kind")
