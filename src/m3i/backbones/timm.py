"""Any timm model as the backbone: ``backbone.name: timm/<model>`` (``timm/vit_small_patch16_224``,
``timm/convnextv2_tiny``, ``timm/resnet50``, ``timm/efficientnet_b0``).

The model is timm's own (``timm.create_model(model, num_classes=0, ...)``), wrapped to answer the
backbone contract (:class:`~m3i.backbones.base.Backbone`); its weights keep timm's names, so the
export is the same timm model. Models built for one input size (timm's ``fixed_input_size``: ViT,
DeiT, Swin, EVA) are built at ``img_size``, and at ``patch_size`` when given and the model takes
one; the others take any size. The tokens are the final features at each position of their grid.
What a family takes as masked input:

- timm's ViTs and DeiTs (``VisionTransformer``): ``drop``, the masked tokens never computed (the
  tokens after the patch embedding and positions are gathered at the visible patches, as lightly
  wraps them), and ``fill``, a learned mask token in place of each masked patch embedding;
- families with a stem followed by stages (ConvNeXt, ConvNeXt V2): ``fill``, the mask token after
  the stem (SimMIM);
- every other model (ResNet, RegNet, EfficientNet, MobileNet, Swin, EVA, ...): plain views only;
  a recipe with a masked source view is refused, naming the modes the model takes.

timm is an optional dependency (``pip install m3i[timm]``); its models need torchvision.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, Features, visible_indices

VIT_MODULES = ("vision_transformer", "deit")  # timm modules whose models are VisionTransformer (token masking)
STEM_STAGES = ("convnext",)  # timm modules whose models run stem -> stages -> norm_pre
# a family's stem (its patch embedding), by the names timm gives it: the first group the model has;
# a batch norm that follows the stem's conv (bn1) belongs to it
STEMS = (("patch_embed",), ("stem",), ("conv_stem", "bn1"), ("conv1", "bn1"))


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
    if module in VIT_MODULES:
        return ("drop", "fill")
    if module in STEM_STAGES:
        return ("fill",)
    return ()


def _fixed_input_size(model: str) -> bool:
    """Whether timm builds ``model`` for one input size (it then takes ``img_size``)."""
    cfg = _timm().models.get_pretrained_cfg(model.split(".")[0])
    return bool(getattr(cfg, "fixed_input_size", False))


def _create(model: str, in_chans: int, img_size: int, patch_size: int | None, drop_path_rate: float,
            model_args: dict) -> tuple[nn.Module, dict]:
    """timm's ``model`` and the arguments it was built with. Only what the model takes is passed:
    ``img_size`` to a model built for one size, ``patch_size`` to those of them that take it (not
    CoAtNet, MaxViT, LeViT, a Mixer), ``drop_path_rate`` when it is not timm's 0."""
    timm = _timm()
    args = {"num_classes": 0, "in_chans": in_chans, **model_args}
    if drop_path_rate:
        args["drop_path_rate"] = drop_path_rate
    if _fixed_input_size(model):
        args["img_size"] = img_size
        if patch_size is not None:
            args["patch_size"] = patch_size
    try:
        try:
            return timm.create_model(model, pretrained=False, **args), args
        except TypeError as e:
            if "'patch_size'" not in str(e) or "patch_size" not in args:
                raise
            args.pop("patch_size")  # the model sets its own patch size
            return timm.create_model(model, pretrained=False, **args), args
    except TypeError as e:
        raise ValueError(f"backbone: timm/{model} does not take these settings ({e})") from None


class TimmBackbone(Backbone):
    """A timm model behind the backbone contract. ``create_args``: what ``timm.create_model`` was
    given besides the name, so that an export rebuilds the same model."""

    def __init__(self, model: str, img_size: int = 224, in_chans: int = 3, patch_size: int | None = None,
                 drop_path_rate: float = 0.0, fill: bool = False, frozen_patch_embed: bool = False, **model_args):
        super().__init__()
        self.model_name, self.family = model, _module(model)
        self.vit = self.family in VIT_MODULES
        self.input_modes = timm_input_modes(model)
        self.supports_drop = "drop" in self.input_modes
        self.model, self.create_args = _create(model, in_chans, img_size, patch_size, drop_path_rate, model_args)
        self.img_size, self.in_chans = img_size, in_chans
        # the width of the pooled features (timm's pre-logits; wider than the last map in MobileNetV3)
        self.embed_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        self._find_grid()
        self.patch_size = img_size // self.grid_size[0]
        self.mask_token = None
        if fill and "fill" in self.input_modes:  # in place of a patch embedding (ViT) or after the stem
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim if self.vit else self._stem_width()))
        if frozen_patch_embed:
            self.freeze_patch_embed(True)

    def _find_grid(self) -> None:
        """The token grid of the features, and how to read tokens from them: timm gives token
        sequences (class / register tokens first), NCHW maps, or NHWC maps (Swin)."""
        m = self.model
        self.prefix = int(getattr(m, "num_prefix_tokens", 0))
        self.channels_last_out = getattr(m, "output_fmt", "NCHW") == "NHWC"
        if self.vit:
            self.grid_size = tuple(m.patch_embed.grid_size)
            return
        with torch.no_grad():  # the grid of the final features (eval mode: batch norm keeps its statistics)
            fm = m.eval().forward_features(torch.zeros(1, self.in_chans, self.img_size, self.img_size))
        m.train()
        if fm.ndim == 3:  # a square grid of tokens (m3i's images are square) after the prefix
            n = fm.shape[1] - self.prefix
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"backbone.name: timm/{self.model_name} gives {n} tokens after its "
                                 f"{self.prefix} prefix tokens, no square grid m3i can lay them on")
            self.grid_size = (side, side)
        else:
            self.grid_size = tuple(fm.shape[1:3] if self.channels_last_out else fm.shape[-2:])
            self.prefix = 0

    def _tokens(self, fm: Tensor) -> Tensor:
        """timm's final features -> (B, N, embed_dim) patch tokens."""
        if fm.ndim == 3:
            return fm[:, self.prefix:]
        if self.channels_last_out:
            return fm.flatten(1, 2)
        b, c, h, w = fm.shape
        if c == self.embed_dim:
            return fm.flatten(2).transpose(1, 2)
        # the pooled features are wider than the map (MobileNetV3: a 1×1 conv after the pooling):
        # each position goes through the head as a 1×1 map, so tokens and pooled features share a width
        cells = fm.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1)
        return self.model.forward_head(cells, pre_logits=True).view(b, h * w, -1)

    def _stem_width(self) -> int:
        return int([p for p in self.stem_module().parameters() if p.ndim == 4][-1].shape[0])

    # -- the contract ----------------------------------------------------------------------------
    def forward_features(self, x: Tensor, visible: Tensor | None = None, mode: str = "drop",
                         return_layers: int = 0, count: int | None = None) -> Features:
        if visible is not None and mode not in self.input_modes:
            modes = " or ".join(repr(m) for m in self.input_modes) or "no masked input (plain views only)"
            raise ValueError(f"timm/{self.model_name} takes {modes}, not mode={mode!r}")
        if mode == "fill" and visible is not None and self.mask_token is None:
            raise ValueError(f"timm/{self.model_name}: mode='fill' needs the backbone built with fill=True")
        if self.vit:
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
        tokens = filled = self._tokens(fm)
        if visible is not None:
            idx = visible_indices(visible, count)
            tokens = torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return Features(pooled, tokens, filled=filled if visible is not None else None)

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
        tokens = filled = h[:, self.prefix:]
        if keep is not None:  # fill: every position computed, returned at the visible ones
            gather = lambda t: torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
            tokens, layers = gather(tokens), [gather(t) for t in layers]
        return Features(pooled, tokens, layers, filled=filled if keep is not None else None)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def stem_module(self) -> nn.Module:
        m = self.model
        for names in STEMS:
            if hasattr(m, names[0]):
                parts = [getattr(m, n) for n in names if isinstance(getattr(m, n, None), nn.Module)]
                return parts[0] if len(parts) == 1 else nn.ModuleList(parts)
        raise ValueError(f"backbone.frozen_patch_embed: timm/{self.model_name} has no stem m3i can name "
                         f"({', '.join(names[0] for names in STEMS)}); leave it false")

    @property
    def num_layers(self) -> int:
        return len(self.model.blocks) + 1 if self.vit else 2

    def layer_id(self, name: str) -> int:
        """Stem 0, block i i + 1 (ViTs), the rest ``num_layers``."""
        stem = tuple(f"model.{n}" for names in STEMS for n in names)
        if name.startswith((*stem, "model.cls_token", "model.reg_token", "model.pos_embed", "mask_token")):
            return 0
        if self.vit and name.startswith("model.blocks."):
            return int(name.split(".")[2]) + 1
        return self.num_layers if self.vit else 1

    def no_weight_decay(self) -> set[str]:  # the timm model lists its own (positions, class token)
        return {"mask_token"} if self.mask_token is not None else set()

    def timm_state_dict(self) -> dict[str, Tensor]:
        """The timm model's own state dict (the m3i mask token left out)."""
        return self.model.state_dict()


def build_timm(model: str, **kwargs) -> TimmBackbone:
    return TimmBackbone(model, **kwargs)
