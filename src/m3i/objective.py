"""The objective: Σ_k λ_k · I(ẑ_k ; z_k), one mutual-information term per target.

A term (:class:`m3i.terms.Term`) = source view + target (a registered kind, :mod:`m3i.targets`)
+ target encoder (:mod:`m3i.encoders`) + decoder (:mod:`m3i.decoders`) + estimator
(:mod:`m3i.estimators`), each picked by its ``kind`` from a registry. The objective owns the online
backbone, the view stage (augment, masks), the one EMA teacher shared by every term whose
target encoder is an EMA copy and the frozen target encoders; it returns every term's value and
the weighted total, and it is all the trainer, evaluation and export see of a model: its
checkpointed state, its optimiser groups, its teacher, its image and text embeddings. Nothing
here knows a recipe: recipes are lists of terms in YAML.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from .backbones import Backbone, build_backbone
from .config import Recipe
from .encoders.copies import CopiedEncoder, ema_momentum
from .encoders.text import TextTower
from .estimators import ESTIMATORS
from .layers import no_weight_decay
from .targets import TARGETS, Embedding
from .targets.base import whole
from .targets.caption import Caption
from .terms import Context, Term, Views
from .views import LoaderViews, ViewAugment, draw_visible, visible_count
from .weights import load_weights_into



class EmbeddingCache(Protocol):
    """What :meth:`Objective.forward` reads of gradient accumulation's cache of a batch's micro-batches
    (``m3i.train.accumulation.MicroBatches``): while ``filling``, it keeps every micro-batch's
    embeddings; then it splices the current micro-batch's, with gradient, among the kept ones."""

    filling: bool

    @property
    def target_cache(self) -> dict | None: ...

    def keep(self, embeddings: dict[tuple[str, int], Embedding], features: dict) -> None: ...

    def splice(self, fresh: dict[tuple[str, int], Embedding]) -> dict[tuple[str, int], Embedding]: ...

    def share(self, x: Tensor) -> Tensor: ...


def to_device(tree, device: torch.device):
    """The tensors of a nested dict / list on ``device``: pinned first when it is a GPU, then
    copied without making the host wait (``non_blocking``)."""
    if isinstance(tree, Tensor):
        if device.type == "cuda" and tree.device.type == "cpu":
            tree = tree.pin_memory()
        return tree.to(device, non_blocking=True)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_device(v, device) for v in tree]
    return tree


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
        self.terms = nn.ModuleList(build_term(t, self.backbone, num_classes) for t in recipe.terms)
        self.teacher_layers = max([getattr(t.target_encoder, "top_k", 0) for t in recipe.terms] + [0])
        ema = [t for t in self.terms if t.cfg.target_encoder.kind == "ema"]
        self.teacher = CopiedEncoder(self.backbone, {t.name: t.head_to_copy for t in ema if t.head_to_copy is not None}) \
            if ema else None
        self.frozen = nn.ModuleDict({t.name: load_frozen(t.cfg, self.backbone, t.head_to_copy) for t in self.terms
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
    def masked_views(self) -> list[int]:
        """The views the online encoder sees masked."""
        views = set()
        for t in self.recipe.terms:
            if t.source.masked:
                views |= {t.source.view} | ({1 - t.source.view} if t.swap_views else set())
        return sorted(views)

    def visible_count(self) -> int:
        """Patches every mask of the recipe shows per row: half the grid in the mixed input."""
        return visible_count(self.recipe.views, self.backbone.num_patches)

    def draw(self, batch: dict, views: bool = True) -> dict:
        """The host's share of a step, on the CPU: every random parameter of the views (crops,
        flips, colour) and their masks (``views=False``: none of them), and what each target
        makes of the batch's host data (a caption's tokens or cached embedding)."""
        drawn: dict = {"targets": {t.name: t.target.stage(t, batch) for t in self.terms}}
        if views:
            b, c, h, w = batch["image"].shape
            drawn["views"] = [aug.draw(b, c, h, w) for aug in self.augment]
            drawn["visible"] = {v: draw_visible(self.recipe.views, b, self.backbone.grid_size)
                                for v in self.masked_views()}
        return drawn

    def loader_views(self, seed: int, rank: int = 0, interpolation: str = "bicubic") -> LoaderViews:
        """What makes this objective's views in the data loader, from the decoded originals
        (``Mixture.views``): crops, flips, colour parameters and masks drawn from the step's
        generator (seeded from ``seed``, the step and ``rank``)."""
        return LoaderViews(list(self.augment), self.recipe.views, self.backbone.grid_size, self.masked_views(),
                           seed, rank, interpolation)

    def stage(self, batch: dict, device: torch.device, views: bool = True) -> dict:
        """``batch`` with its tensors and everything :meth:`draw` makes of it on ``device``
        (``batch["drawn"]``), copied pinned and ``non_blocking``: the step that follows reads
        nothing back to the host. A batch whose views the loader made (``crops``) keeps their
        parameters and gets its targets' share."""
        if "crops" in batch:
            drawn = {**batch["drawn"], "targets": self.draw(batch, views=False)["targets"]}
            keys = ("crops", "label", "drawn")
        else:
            drawn, keys = self.draw(batch, views), ("image", "label", "drawn")
        staged = {**batch, "drawn": drawn}
        return {**staged, **to_device({k: staged[k] for k in keys}, torch.device(device))}

    def views_of(self, batch: dict) -> Views:
        """The views of a staged batch: from the loader's crops, or made here from its images."""
        return self.make_views(batch["crops"] if "crops" in batch else batch["image"], batch["drawn"])

    def make_views(self, images: Tensor | Sequence[Tensor], drawn: dict | None = None) -> Views:
        """uint8 (B, C, H, W) -> the recipe's augmented views with their crop boxes and flips, from
        the parameters ``drawn`` by :meth:`stage` (drawn now, on the host, when not given).
        ``images`` a list of each view's crops (the loader's, :meth:`loader_views`): only their
        colour steps run here."""
        cropped = isinstance(images, (list, tuple))
        if drawn is None:
            b, c, h, w = images.shape
            params = to_device([aug.draw(b, c, h, w) for aug in self.augment], images.device)
            visible, count = {}, None
        else:
            params, visible, count = drawn["views"], drawn["visible"], self.visible_count()
        xs = [v.float() / 255.0 for v in images] if cropped else [images.float() / 255.0] * len(self.augment)
        out = [aug.apply(x, p, cropped) for aug, x, p in zip(self.augment, xs, params)]
        return Views([o[0] for o in out], [o[1] for o in out], [o[2] for o in out], visible, count)

    def context(self, batch: dict, views: Views, target_cache: dict | None = None) -> Context:
        """What the terms of one step share: the views, the online backbone, the copied encoders
        (``target_cache``: their features of this batch, when already computed)."""
        copies = {t.name: self.copy_of(t) for t in self.terms if t.cfg.target_encoder.copies_backbone}
        return Context(batch, views, self.backbone, self.recipe.views, copies, self.teacher_layers, target_cache)

    def embed(self, batch: dict, views: Views, target_cache: dict | None = None
              ) -> tuple[dict[tuple[str, int], Embedding], dict]:
        """Every term's predictions and targets on ``batch`` -> ({(term, direction): embedding},
        the target encoders' features; ``target_cache``: those already computed for this batch)."""
        ctx = self.context(batch, views, target_cache)
        embs = {(term.name, i): term.target.embed(term, ctx, s, t) for term in self.terms
                for i, (s, t) in enumerate(type(term.target).view_pairs(term.cfg))}
        return embs, ctx.target_cache

    def score(self, embs: dict[tuple[str, int], Embedding], share=whole) -> dict[str, Tensor]:
        """The outputs of :meth:`forward` from every term's embeddings (:meth:`embed`)."""
        out: dict[str, Tensor] = {}
        total = 0.0
        for term in self.terms:
            loss, n = 0.0, 0
            for i in range(len(type(term.target).view_pairs(term.cfg))):
                emb = embs[term.name, i]
                loss, n = loss + term.target.score(term, emb, share), n + emb.samples
            out[term.name] = loss
            out["n_" + term.name] = n
            total = total + term.cfg.weight * loss
        out["loss"] = total
        return out

    def forward(self, batch: dict, views: Views | None = None, cache: EmbeddingCache | None = None) -> dict[str, Tensor]:
        """-> {"loss": weighted total, <term>: value, "n_<term>": samples used}. ``batch`` as
        :meth:`stage` made it (a batch that was not staged is staged here, on its images' device).
        ``cache``: ``batch`` is one micro-batch of a larger one (:mod:`m3i.train.accumulation`); the
        outputs are those of the larger batch, with gradient through this micro-batch (none
        while the cache is being filled: then its embeddings are kept and nothing returned)."""
        if "drawn" not in batch:
            batch = self.stage(batch, batch["image"].device, views=views is None)
        views = views or self.views_of(batch)
        if cache is not None:
            embs, features = self.embed(batch, views, cache.target_cache)
            if cache.filling:
                cache.keep(embs, features)
                return {}
            return self.score(cache.splice(embs), cache.share)
        ctx = self.context(batch, views)
        out: dict[str, Tensor] = {}
        total = 0.0
        for term in self.terms:
            cfg = term.cfg
            loss, n = 0.0, 0
            for s, t in type(term.target).view_pairs(cfg):  # one direction, or both (swap_views)
                loss_st, n_st = term(ctx, s, t)
                loss, n = loss + loss_st, n + n_st
            out[term.name] = loss
            out["n_" + term.name] = n  # a number, or a device tensor (read when the step is logged)
            total = total + cfg.weight * loss
        out["loss"] = total
        return out

    # -- target encoders -----------------------------------------------------------------------
    def copy_of(self, term: Term) -> CopiedEncoder:
        """The copied target encoder a term reads (the shared EMA teacher or its frozen model)."""
        return self.teacher if term.cfg.target_encoder.kind == "ema" else self.frozen[term.name]

    def encoders(self) -> list[Backbone]:
        """The online backbone and the backbone of every copied target encoder."""
        nets = [self.backbone] + ([self.teacher.backbone] if self.teacher is not None else [])
        return nets + [f.backbone for f in self.frozen.values() if f.backbone not in nets]

    def online_heads(self) -> dict[str, nn.Module]:
        heads = self.teacher.heads if self.teacher is not None else {}
        return {t.name: t.head_to_copy for t in self.terms if t.name in heads}

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


def build_term(cfg, backbone: Backbone, num_classes: int) -> Term:
    """A term of the recipe: its target kind, estimator and decoder from the registries, the
    decoder's modules and the target's own (class table, text tower) built onto it."""
    target = TARGETS[cfg.target.kind]()
    estimator = ESTIMATORS[cfg.estimator.kind](cfg.estimator)
    out_dim = target.out_dim(cfg, backbone)
    modules = cfg.decoder.build(backbone.embed_dim, out_dim)
    width = cfg.decoder.width_of(backbone.embed_dim, out_dim)
    return Term(cfg, target, estimator, {**modules, **target.build(cfg, width, backbone, num_classes)})


def load_frozen(cfg, backbone: Backbone, head: nn.Module | None) -> CopiedEncoder:
    """A frozen target encoder: a backbone (the recipe's, or the one the term names) with weights
    from a safetensors file, in m3i's or timm's layout."""
    from safetensors.torch import load_file

    enc = cfg.target_encoder
    net = build_backbone(enc.backbone.name, **enc.backbone.kwargs()) if enc.backbone else backbone
    teacher = CopiedEncoder(net, {cfg.name: head} if head is not None else {})
    try:
        state = load_file(enc.weights)
    except (OSError, Exception) as e:  # safetensors raises its own error type for corrupt files
        raise ValueError(f"terms.{cfg.name}.target_encoder.weights: cannot read {enc.weights}: {e}") from None
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    load_weights_into(teacher.backbone, state, f"terms.{cfg.name}.target_encoder.weights {enc.weights}",
                      optional_prefixes=("mask_token",))
    return teacher


__all__ = ["Objective", "Term", "Context", "Views", "to_device"]
