"""Targets z of the mutual-information terms, one module per kind, with their target encoders
f_φ (``encoders``, ``text``) and decoders g (``decoders``). Every module registers its kind in
:data:`TARGETS` when imported; a new kind of target is a new module."""
from ..registry import import_parts
from .base import TARGETS, DenseTarget, Target, TargetCfg

import_parts(__name__, __path__)

__all__ = ["TARGETS", "DenseTarget", "Target", "TargetCfg"]
