"""Targets z of the mutual-information terms, one module per kind (label, caption, view,
dense_view, pixels); their target encoders f_φ live in :mod:`m3i.encoders`, their decoders g in
:mod:`m3i.decoders`. Every module registers its kind in :data:`TARGETS` when imported; a new kind
of target is a new module, in m3i or in a plugin."""
from ..registry import import_parts
from .base import TARGETS, DenseTarget, Embedding, Target, TargetCfg, build_term, build_terms, whole

import_parts(__name__, __path__)

__all__ = ["TARGETS", "DenseTarget", "Embedding", "Target", "TargetCfg", "build_term", "build_terms", "whole"]
