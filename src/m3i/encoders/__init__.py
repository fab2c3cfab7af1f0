"""Target encoders f_φ: what turns a target view t_t(x) into the target representation z, one
module per kind (identity, class table, text towers, EMA / online / frozen copies of the
backbone). Every module registers its settings in :data:`TARGET_ENCODERS` when imported."""
from ..registry import import_parts
from .base import TARGET_ENCODERS, TargetEncoderCfg

import_parts(__name__, __path__)

__all__ = ["TARGET_ENCODERS", "TargetEncoderCfg"]
