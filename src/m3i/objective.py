"""The objective: Σ_k λ_k · I(ẑ_k ; z_k), one mutual-information term per target.

A term = source view + target (a registered kind, :mod:`m3i.targets`) + target encoder +
decoder + estimator (a registered kind, :mod:`m3i.estimators`). The objective owns the online
backbone, the view stage (augment, masks), the one EMA teacher shared by every term whose
target encoder is an EMA copy and the frozen target encoders; it returns every term's value and
the weighted total, and it is all the trainer, evaluation and export see of a model: its
checkpointed state, its optimiser groups, its teacher, its image and text embeddings. Nothing
here knows a recipe: recipes are lists of terms in YAML.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .backbones import Backbone, Features, build_backbone
from .config import Recipe, TermCfg
from .estimators import ESTIMATORS
from .layers import no_weight_decay
from .targets import TARGETS
from .targets.caption import Caption
from .targets.encoders import Teacher, ema_momentum
from .targets.text import TextTower
from .views import ViewAugment, block_mask, mix_visible, random_mask
from .weights import load_weights_into


@dataclass
class Views:
    """The augmented views of one batch and how each was made."""

    images: list[Tensor]   # each (B, C, S, S), normalised
    boxes: list[Tensor]    # each (B, 4): crop (i, j, h, w) in source pixels
    flips: list[Tensor]    # each (B,) bool
    visible: dict[int, Tensor] = field(default_factory=dict)  # (B, N) bool per masked view; drawn when absent


class Context:
    """Everything the terms of one step share, each piece computed once on first use."""

    def __init__(self, objective: Objective, batch: dict, views: Views):
        self.obj, self.batch, self.views = objective, batch, views
        self.batch_size = views.images[0].shape[0]
        self._visible: dict[int, Tensor] = dict(views.visible)
        self._online: dict[tuple[int, bool], Features] = {}
        self._teacher: dict[tuple[int, int | tuple], Features] = {}  # (id of the copy, view)

    def visible(self, view: int) -> Tensor:
        """(B, N) bool: the patches of ``view`` the online encoder sees."""
        if view not in self._visible:
            obj, b = self.obj, self.batch_size
            device = self.views.images[view].device
            m = obj.recipe.views.mask
            if obj.recipe.views.input_mode == "mix":
                vis = mix_visible(b, obj.backbone.grid_size, kind=m.kind, device=device)
            else:
                make = block_mask if m.kind == "block" else random_mask
                vis = ~make(b, obj.backbone.grid_size, m.ratio, device=device)
            self._visible[view] = vis
        return self._visible[view]

    def online(self, view: int, masked: bool) -> Features:
        key = (view, masked)
        if key not in self._online:
            x = self.views.images[view]
            if masked:
                self._online[key] = self.obj.backbone.forward_features(
                    x, self.visible(view), mode=self.obj.recipe.views.input_mode)
            else:
                self._online[key] = self.obj.backbone.forward_features(x)
        return self._online[key]

    def view(self, view: int | tuple) -> tuple[Tensor, Tensor, Tensor]:
        """(images, boxes, flips) of a view index, or of ("paired", s, t): in the mixed input the
        first image of each canvas takes view s and its partner view t (the paper's assignment:
        one image predicts its own view, the other a different augmented view)."""
        v = self.views
        if isinstance(view, int):
            return v.images[view], v.boxes[view], v.flips[view]
        _, s, t = view
        first = torch.arange(self.batch_size, device=v.images[s].device) < self.batch_size // 2
        pick = lambda a, b: torch.where(first.view(-1, *[1] * (a.dim() - 1)), a, b)  # noqa: E731
        return pick(v.images[s], v.images[t]), pick(v.boxes[s], v.boxes[t]), pick(v.flips[s], v.flips[t])

    @torch.no_grad()
    def copy(self, term: Term, view: int | tuple) -> Features:
        """Features of ``view`` from the term's copied target encoder (the EMA teacher, shared by
        every EMA term, or the term's frozen model)."""
        net = self.obj.copy_of(term)
        key = (id(net), view)
        if key not in self._teacher:
            self._teacher[key] = net.backbone.forward_features(
                self.view(view)[0], return_layers=self.obj.teacher_layers)
        return self._teacher[key]


class Term(nn.Module):
    """One mutual-information term I(g_k(f_θ(t_s(x))) ; f_φ(t_t(x))): its decoder g_k, the modules
    its target kind owns (a class table, a text tower), its temperature; the target kind and the
    estimator compute it."""

    def __init__(self, cfg: TermCfg, backbone: Backbone, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.name = cfg.name
        self.target = TARGETS[cfg.target.kind]()
        self.estimator = ESTIMATORS[cfg.estimator.kind](cfg.estimator)
        for name, module in cfg.decoder.build(backbone.embed_dim, self.target.out_dim(cfg, backbone)).items():
            self.add_module(name, module)
        self.target.build(self, backbone, num_classes)
        scale = torch.tensor(math.log(1.0 / getattr(cfg.estimator, "temperature", 1.0)))
        if getattr(cfg.estimator, "learn_temperature", False):
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale, persistent=False)

    @property
    def teacher_head(self) -> nn.Module | None:
        """The online head whose copy the target passes through (the term's projector)."""
        enc = self.cfg.target_encoder
        return self.decoder if enc.copies_backbone and enc.head else None

    @property
    def temperature(self) -> Tensor:
        return 1.0 / self.log_scale.clamp(max=math.log(100.0)).exp()

    def predict(self, pooled: Tensor) -> Tensor:
        """A global prediction ẑ from pooled features: projector, then predictor."""
        return self.predictor(self.decoder(pooled))

    def forward(self, ctx: Context, s: int, t: int) -> tuple[Tensor, int]:
        """-> (loss, number of samples that carried this target)."""
        return self.target.loss(self, ctx, s, t)


class Objective(nn.Module):
    """The sum of a recipe's mutual-information terms around one online backbone."""

    def __init__(self, recipe: Recipe, num_classes: int = 0, backbone: Backbone | None = None):
        super().__init__()
        self.recipe = recipe
        bcfg = recipe.backbone
        mode = recipe.views.input_mode
        masked = any(t.source.masked for t in recipe.terms)
        self.backbone = backbone or build_backbone(bcfg.name, **bcfg.kwargs(), **({"fill": True} if mode == "fill" else {}))
        if masked and mode == "drop" and not self.backbone.supports_drop:
            raise ValueError(f"views.input_mode: {bcfg.name} is convolutional and cannot drop masked tokens; "
                             f"use views.input_mode=fill (a learned mask token) or views.input_mode=mix (two images "
                             f"share one canvas)")
        if bcfg.grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        size = self.backbone.img_size
        self.augment = nn.ModuleList(
            ViewAugment(size=size, **recipe.views.augment_for(v).model_dump()) for v in range(recipe.views.count))
        self.terms = nn.ModuleList(Term(t, self.backbone, num_classes) for t in recipe.terms)
        self.teacher_layers = max([getattr(t.target_encoder, "top_k", 0) for t in recipe.terms] + [0])
        ema = [t for t in self.terms if t.cfg.target_encoder.kind == "ema"]
        self.teacher = Teacher(self.backbone, {t.name: t.teacher_head for t in ema if t.teacher_head is not None}) \
            if ema else None
        self.frozen = nn.ModuleDict({t.name: load_frozen(t.cfg, self.backbone, t.teacher_head) for t in self.terms
                                     if t.cfg.target_encoder.kind == "frozen"})

    @classmethod
    def from_checkpoint_state(cls, recipe: Recipe, weights: dict[str, Tensor], where: str) -> Objective:
        """The objective a checkpoint's weights were saved from (its class tables sized by them)."""
        num_classes = max([TARGETS[t.target.kind].num_classes_in(weights, f"terms.{i}.")
                           for i, t in enumerate(recipe.terms)] + [0])
        obj = cls(recipe, num_classes)
        obj.load_checkpoint_state(weights, where)
        return obj

    # -- the loss ------------------------------------------------------------------------------
    def make_views(self, images: Tensor) -> Views:
        """uint8 (B, C, H, W) -> the recipe's augmented views with their crop boxes and flips."""
        x = images.float() / 255.0
        out = [aug(x) for aug in self.augment]
        return Views([o[0] for o in out], [o[1] for o in out], [o[2] for o in out])

    def forward(self, batch: dict, views: Views | None = None) -> dict[str, Tensor]:
        """-> {"loss": weighted total, <term>: value, "n_<term>": samples used}."""
        views = views or self.make_views(batch["image"])
        ctx = Context(self, batch, views)
        out: dict[str, Tensor] = {}
        total = 0.0
        for term in self.terms:
            cfg = term.cfg
            loss, n = term(ctx, cfg.source.view, cfg.target.view if term.target.image else cfg.source.view)
            if cfg.swap_views:
                loss2, n2 = term(ctx, 1 - cfg.source.view, 1 - cfg.target.view)
                loss, n = loss + loss2, n + n2
            out[term.name] = loss
            out["n_" + term.name] = torch.tensor(n)
            total = total + cfg.weight * loss
        out["loss"] = total
        return out

    # -- target encoders -----------------------------------------------------------------------
    def copy_of(self, term: Term) -> Teacher:
        """The copied target encoder a term reads (the shared EMA teacher or its frozen model)."""
        return self.teacher if term.cfg.target_encoder.kind == "ema" else self.frozen[term.name]

    def encoders(self) -> list[Backbone]:
        """The online backbone and the backbone of every copied target encoder."""
        nets = [self.backbone] + ([self.teacher.backbone] if self.teacher is not None else [])
        return nets + [f.backbone for f in self.frozen.values() if f.backbone not in nets]

    def online_heads(self) -> dict[str, nn.Module]:
        heads = self.teacher.heads if self.teacher is not None else {}
        return {t.name: t.teacher_head for t in self.terms if t.name in heads}

    @torch.no_grad()
    def update_teacher(self, step: int, total_steps: int, skip: Tensor | None = None) -> float | None:
        """EMA step of the teacher after an optimiser step (none when the 0-d bool ``skip`` is
        true: a skipped step); returns the momentum of the schedule."""
        if self.teacher is None:
            return None
        m = ema_momentum(step, total_steps, self.recipe.ema.momentum, self.recipe.ema.end)
        self.teacher.update(self.backbone, self.online_heads(), m, skip)
        return m

    @torch.no_grad()
    def sync_teacher(self) -> None:
        """Make the EMA teacher a copy of the online backbone and heads (after the online weights
        were loaded from elsewhere, as a multi-stage pipeline's next stage does)."""
        if self.teacher is not None:
            self.teacher.update(self.backbone, self.online_heads(), 0.0)

    def prepare(self, data, progress: bool = True) -> None:
        """Work each target does once before training, on the data (``captions()``) it will see."""
        for term in self.terms:
            term.target.prepare(term, data, progress=progress)

    # -- state ---------------------------------------------------------------------------------
    def unsaved_keys(self) -> set[str]:
        """State that a checkpoint leaves out: frozen pre-trained text towers (they come from their
        package) and frozen target encoders (they come from their file)."""
        keys = {f"frozen.{k}" for k in self.frozen.state_dict()}
        for name, module in self.named_modules():
            if isinstance(module, TextTower):
                keys |= {f"{name}.{k}" for k in module.frozen_state_keys()}
        return keys

    def checkpoint_state(self, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Everything that is learned or tracked; ``state``: the objective's state dict when already
        at hand (gathered from shards)."""
        unsaved = self.unsaved_keys()
        state = self.state_dict() if state is None else state
        return {k: v for k, v in state.items() if k not in unsaved}

    def load_checkpoint_state(self, weights: dict[str, Tensor], where: str) -> None:
        """Load :meth:`checkpoint_state` back; a clear error names ``where`` when it does not fit."""
        load_weights_into(self, weights, where, tuple(self.unsaved_keys()))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups of the trainable parameters: no weight decay on 1-D tensors (norms, biases,
        temperatures) and on what each module lists in its own ``no_weight_decay()``."""
        keep = no_weight_decay(self)
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name in keep else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # -- embeddings ----------------------------------------------------------------------------
    @property
    def image_mean(self) -> list[float]:
        return list(self.augment[0].mean[: self.backbone.in_chans])

    @property
    def image_std(self) -> list[float]:
        return list(self.augment[0].std[: self.backbone.in_chans])

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> the backbone's input (float, normalised as in training)."""
        mean = torch.tensor(self.image_mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255 - mean) / std

    def caption_term(self) -> Term | None:
        return next((t for t in self.terms if isinstance(t.target, Caption)), None)

    def encode_image(self, images: Tensor, head: str | None = None) -> Tensor:
        """uint8 images -> pooled backbone features (B, D); ``head="caption"``: through the caption
        term's decoder, the image embedding that :meth:`encode_text` matches."""
        pooled = self.backbone.forward_features(self.normalize(images)).pooled
        if head is None:
            return pooled
        if head != "caption" or self.caption_term() is None:
            raise ValueError(f"recipe {self.recipe.name!r} has no {head!r} target to embed images for")
        return self.caption_term().predict(pooled)

    def encode_text(self, captions: Sequence[str]) -> Tensor:
        """Captions -> (B, D) text embeddings in the space of ``encode_image(..., head="caption")``."""
        term = self.caption_term()
        if term is None:
            raise ValueError(f"recipe {self.recipe.name!r} has no text tower; zero-shot classification and "
                             f"retrieval need a recipe with a caption target (clip, m3i)")
        return Caption.encode(term, captions)


def load_frozen(cfg: TermCfg, backbone: Backbone, head: nn.Module | None) -> Teacher:
    """A frozen target encoder: a backbone (the recipe's, or the one the term names) with weights
    from a safetensors file, in m3i's or timm's layout."""
    from safetensors.torch import load_file

    enc = cfg.target_encoder
    net = build_backbone(enc.backbone.name, **enc.backbone.kwargs()) if enc.backbone else backbone
    teacher = Teacher(net, {cfg.name: head} if head is not None else {})
    try:
        state = load_file(enc.weights)
    except (OSError, Exception) as e:  # safetensors raises its own error type for corrupt files
        raise ValueError(f"terms.{cfg.name}.target_encoder.weights: cannot read {enc.weights}: {e}") from None
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    load_weights_into(teacher.backbone, state, f"terms.{cfg.name}.target_encoder.weights {enc.weights}",
                      optional_prefixes=("mask_token",))
    return teacher


__all__ = ["Objective", "Term", "Context", "Views"]
