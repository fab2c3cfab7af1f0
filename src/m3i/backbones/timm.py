"""Any timm model as the backbone: ``backbone.name: timm/<model>`` (``timm/vit_small_patch16_224``,
``timm/convnextv2_tiny``, ``timm/efficientnet_b0``).

The model is timm's own (``timm.create_model(model, num_classes=0, ...)``), wrapped to answer the
backbone contract (:class:`~m3i.backbones.base.Backbone`); its weights keep timm's names, so the
export is the same timm model. What a family takes as masked input:

- timm's ViTs (``vision_transformer``): ``drop``, the masked tokens never computed (the tokens after
  the patch embedding and positions are gathered at the visible patches, as lightly wraps them),
  and ``fill``, a learned mask token in place of each masked patch embedding;
- families with a stem followed by stages (ConvNeXt, ConvNeXt V2): ``fill``, the mask token after
  the stem (SimMIM);
- every other model: plain views only; a recipe with a masked source view is refused, naming the
  modes the model takes.

timm is an optional dependency (``pip install m3i[timm]``); its models need torchvision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, Features, visible_indices

VIT_MODULE = "vision_transformer"
STEM_STAGES = ("convnext",)  # timm modules whose models run stem -> stages -> norm_pre


def _timm():
    try:
        import timm
    except ImportError as e:
        raise ValueError(f"backbone.name: timm/<model> needs timm (pip install 'm3i[timm]'): {e}") from None
    return timm


def _module(model: str) -> str:
    """The timm module that defines ``model`` (a one-line error for a name timm does not know)."""
    timm = _timm()
    arch = model.split(".")[0]
    if not timm.is_model(arch):
        near = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ValueError(f"backbone.name: timm has no model {arch!r}" + (f"; similar: {', '.join(near)}" if near else ""))
    from timm.models._registry import _model_to_module

    return _model_to_module[arch]


def timm_input_modes(model: str) -> tuple[str, ...]:
    """The input modes of masked views that timm's ``model`` takes (see the module docstring)."""
    module = _module(model)
    if module == VIT_MODULE:
        return ("drop", "fill")
    if module in STEM_STAGES:
        return ("fill",)
    return ()


class TimmBackbone(Backbone):
    """A timm model behind the backbone contract. ``create_args``: what ``timm.create_model`` was
    given besides the name, so that an export rebuilds the same model."""

    def __init__(self, model: str, img_size: int = 224, in_chans: int = 3, patch_size: int | None = None,
                 drop_path_rate: float = 0.0, fill: bool = False, frozen_patch_embed: bool = False, **model_args):
        super().__init__()
        timm = _timm()
        self.model_name, self.family = model, _module(model)
        self.input_modes = timm_input_modes(model)
        self.supports_drop = "drop" in self.input_modes
        args = {"num_classes": 0, "in_chans": in_chans, "drop_path_rate": drop_path_rate, **model_args}
        if self.family == VIT_MODULE:
            args["img_size"] = img_size
            if patch_size is not None:
                args["patch_size"] = patch_size
        self.create_args = args
        try:
            self.model = timm.create_model(model, pretrained=False, **args)
        except TypeError as e:
            raise ValueError(f"backbone: timm's {model} does not take these settings ({e})") from None
        self.img_size, self.in_chans = img_size, in_chans
        self.embed_dim = int(self.model.num_features)
        if self.family == VIT_MODULE:
            self.grid_size = tuple(self.model.patch_embed.grid_size)
            self.prefix = int(self.model.num_prefix_tokens)
        else:
            with torch.no_grad():  # the grid of the final feature map (eval mode: batch norm keeps its statistics)
                fm = self.model.eval().forward_features(torch.zeros(1, in_chans, img_size, img_size))
            self.model.train()
            self.grid_size = tuple(fm.shape[-2:])
            self.prefix = 0
        self.patch_size = img_size // self.grid_size[0]
        width = self.embed_dim if self.family == VIT_MODULE else self._stem_width()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if fill and "fill" in self.input_modes else None
        if frozen_patch_embed:
            self.freeze_patch_embed(True)

    def _stem_width(self) -> int:
        stem = self.stem_module()
        return int(next(p for n, p in stem.named_parameters() if p.ndim == 4).shape[0]) if stem is not None else 0

    # -- the contract ----------------------------------------------------------------------------
    def forward_features(self, x: Tensor, visible: Tensor | None = None, mode: str = "drop",
                         return_layers: int = 0, count: int | None = None) -> Features:
        if visible is not None and mode not in self.input_modes:
            modes = " or ".join(repr(m) for m in self.input_modes) or "no masked input (plain views only)"
            raise ValueError(f"timm/{self.model_name} takes {modes}, not mode={mode!r}")
        if mode == "fill" and visible is not None and self.mask_token is None:
            raise ValueError(f"timm/{self.model_name}: mode='fill' needs the backbone built with fill=True")
        if self.family == VIT_MODULE:
            return self._vit(x, visible, mode, return_layers, count)
        if return_layers:
            raise ValueError(f"return_layers: timm/{self.model_name} returns no block outputs (only timm's ViTs do)")
        if visible is not None:  # fill after the stem
            m = self.model
            h = m.stem(x)
            vis = visible.view(-1, 1, *self.grid_size).float()
            vis = F.interpolate(vis, size=h.shape[-2:], mode="nearest").bool()
            h = torch.where(vis, h, self.mask_token.view(1, -1, 1, 1).to(h.dtype))
            fm = m.norm_pre(m.stages(h))
        else:
            fm = self.model.forward_features(x)
        pooled = self.model.forward_head(fm, pre_logits=True)
        tokens = fm.flatten(2).transpose(1, 2)
        if visible is not None:
            idx = visible_indices(visible, count)
            tokens = torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return Features(pooled, tokens)

    def _vit(self, x: Tensor, visible: Tensor | None, mode: str, return_layers: int, count: int | None) -> Features:
        m = self.model
        depth = len(m.blocks)
        if not 0 <= return_layers <= depth:
            raise ValueError(f"return_layers must be an integer in [0, depth={depth}], got {return_layers!r}")
        h = m.patch_embed(x)                                                  # (B, N, D)
        if visible is not None and mode == "fill":
            h = torch.where(visible.unsqueeze(-1), h, self.mask_token.to(h.dtype))
        h = m._pos_embed(h)                                                   # class / register tokens first
        keep = None
        if visible is not None:
            keep = visible_indices(visible, count)
            if mode == "drop":  # the masked tokens are never computed
                prefix = torch.arange(self.prefix, device=h.device).expand(h.shape[0], -1)
                rows = torch.cat([prefix, keep + self.prefix], dim=1)
                h = torch.gather(h, 1, rows.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
                keep = None
        h = m.norm_pre(h)
        layers = []
        for i, blk in enumerate(m.blocks):
            h = blk(h)
            if i >= depth - return_layers:
                layers.append(h[:, self.prefix:])
        h = m.norm(h)
        pooled = m.forward_head(h, pre_logits=True)
        tokens = h[:, self.prefix:]
        if keep is not None:  # fill: every position computed, returned at the visible ones
            gather = lambda t: torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
            tokens, layers = gather(tokens), [gather(t) for t in layers]
        return Features(pooled, tokens, layers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def stem_module(self) -> nn.Module:
        m = self.model
        for name in ("patch_embed", "stem", "conv_stem"):
            if hasattr(m, name):
                return getattr(m, name)
        raise ValueError(f"backbone.frozen_patch_embed: timm/{self.model_name} has no stem m3i can name")

    @property
    def num_layers(self) -> int:
        return len(self.model.blocks) + 1 if self.family == VIT_MODULE else 2

    def layer_id(self, name: str) -> int:
        """Stem 0, block i i + 1 (ViTs), the rest ``num_layers``."""
        stem = ("model.patch_embed", "model.cls_token", "model.reg_token", "model.pos_embed", "model.stem",
                "model.conv_stem", "model.bn1", "mask_token")
        if name.startswith(stem):
            return 0
        if self.family == VIT_MODULE and name.startswith("model.blocks."):
            return int(name.split(".")[2]) + 1
        return self.num_layers if self.family == VIT_MODULE else 1

    def no_weight_decay(self) -> set[str]:  # the timm model lists its own (positions, class token)
        return {"mask_token"} if self.mask_token is not None else set()

    def timm_state_dict(self) -> dict[str, Tensor]:
        """The timm model's own state dict (the m3i mask token left out)."""
        return self.model.state_dict()


def build_timm(model: str, **kwargs) -> TimmBackbone:
    return TimmBackbone(model, **kwargs)
