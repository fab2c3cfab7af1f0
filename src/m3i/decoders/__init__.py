"""Decoders g_k: turn the encoder's output into a prediction ẑ of target k, one module per kind
(``global``: MLP projector + predictor on the pooled features; ``dense``: projector and predictor
blocks with queries). Every module registers its settings in :data:`DECODERS` when imported."""
from ..registry import import_parts
from .base import DECODERS, DecoderCfg

import_parts(__name__, __path__)

__all__ = ["DECODERS", "DecoderCfg"]
