"""Backbones f_θ behind one interface; importing this package registers every config."""
from .base import Backbone, Features, visible_indices
from .registry import BackboneCfg, backbone_names, build_backbone, input_modes, register
from . import convnext, resnet, vit  # noqa: F401  (register convnext_*, resnet*, vit_*)

__all__ = ["Backbone", "BackboneCfg", "Features", "backbone_names", "build_backbone", "input_modes", "register",
           "visible_indices"]
