"""What every kind of decoder g_k answers to: its settings, picked by ``kind``, and the modules
it builds onto a term."""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..registry import Registry
from ..schema import Strict


class DecoderCfg(Strict):
    """The settings of a decoder, registered with ``@DECODERS.register``.

    ``forms``: the shapes of target (:data:`m3i.estimators.FORMS`) its predictions fit;
    :meth:`build` gives the modules the term holds under their names (``decoder``, and for the
    global decoder ``predictor``); :meth:`width_of` the width of its predictions."""

    kind: str
    forms: ClassVar[frozenset[str]] = frozenset()

    def build(self, in_dim: int, out_dim: int | None) -> dict[str, nn.Module]:
        """``in_dim``: the backbone's width; ``out_dim``: the width the target asks for (None: the
        decoder's own)."""
        raise NotImplementedError

    def width_of(self, in_dim: int, out_dim: int | None) -> int:
        raise NotImplementedError


DECODERS: Registry[type[DecoderCfg]] = Registry("decoder kind")
