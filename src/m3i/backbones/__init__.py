"""Backbones f_θ behind one interface; importing this package registers every config."""
from .base import Backbone, Features, backbone_names, build_backbone, register, visible_indices
from . import vit  # noqa: F401  (registers vit_*)

try:  # the convolutional family registers convnext_*
    from . import convnext  # noqa: F401
except ImportError:  # pragma: no cover - until it lands
    pass

__all__ = ["Backbone", "Features", "backbone_names", "build_backbone", "register", "visible_indices"]
