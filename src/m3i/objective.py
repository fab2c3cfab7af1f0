"""The objective: Σ_k λ_k · I(ẑ_k ; z_k), one mutual-information term per target.

A term (:class:`m3i.terms.Term`) = source view + target (a registered kind, :mod:`m3i.targets`)
+ target encoder (:mod:`m3i.encoders`) + decoder (:mod:`m3i.decoders`) + estimator
(:mod:`m3i.estimators`), each picked by its ``kind`` from a registry. Around the online backbone
the objective owns two parts: the view stage (:class:`m3i.views.ViewStage`: augmentations, masks,
the host's share of a step) and the copied target encoders
(:class:`m3i.encoders.targets.TargetCopies`: the one EMA teacher, frozen models). A step is every
term's rows (:meth:`Objective.embed`), then their weighted sum (:meth:`Objective.score`), in one
pass or in micro-batches. The objective is all the trainer, evaluation and export see of a model.
Nothing here knows a recipe: recipes are lists of terms in YAML.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from .backbones import Backbone, build_backbone
from .batch import Batch, Losses, to_device
from .config import Recipe
from .encoders.targets import TargetCopies
from .layers import no_weight_decay
from .targets import TARGETS, build_terms
from .terms import Context, EmbeddingCache, Embeddings, Term, Views, whole
from .views import ViewStage
from .weights import load_weights_into


def _of(part: str, *names: str) -> tuple[property, ...]:
    """Attributes of the objective that are its part ``part``'s own ``names`` (methods or values)."""
    return tuple(property(lambda self, n=n: getattr(getattr(self, part), n), doc=f"``{part}.{n}``") for n in names)


class Objective(nn.Module):
    """The sum of a recipe's mutual-information terms around one online backbone."""

    def __init__(self, recipe: Recipe, num_classes: int = 0, backbone: Backbone | None = None):
        super().__init__()
        self.recipe = recipe
        self.backbone = net = online_backbone(recipe, backbone)
        masked = set().union(*(TARGETS[t.target.kind].masked_views(t, recipe.views) for t in recipe.terms))
        self.view_stage = ViewStage(recipe.views, masked, net.img_size, net.grid_size, net.in_chans)
        self.terms = nn.ModuleList(build_terms(recipe.terms, net, num_classes, recipe.views))
        self.copies = TargetCopies(net, self.terms, recipe.ema)
        self.teacher, self.frozen = self.copies.teacher, self.copies.frozen  # its modules, as checkpoints name them

    @classmethod
    def from_checkpoint_state(cls, recipe: Recipe, weights: dict[str, Tensor], where: str) -> Objective:
        """The objective a checkpoint's weights were saved from (its class tables sized by them)."""
        num_classes = max([TARGETS[t.target.kind].num_classes_in(weights, f"terms.{i}.")
                           for i, t in enumerate(recipe.terms)] + [0])
        obj = cls(recipe, num_classes)
        obj.load_checkpoint_state(weights, where)
        return obj

    # -- a step --------------------------------------------------------------------------------
    def stage(self, batch: Batch | Mapping, device, views: bool = True) -> Batch:
        """``batch`` with the host's share of its step (the views' parameters and masks, none with
        ``views=False``; what each target makes of its host data, :meth:`Target.stage`) on
        ``device``, copied pinned and ``non_blocking``: the step that follows reads nothing back."""
        batch = Batch.of(batch)
        targets = {t.name: t.target.stage(t, batch) for t in self.terms}
        return self.view_stage.stage(batch, device, targets, views)

    def context(self, batch: Batch | Mapping, views: Views, target_cache: dict | None = None) -> Context:
        """What the terms of one step share: the views, the online backbone, the copied encoders
        (``target_cache``: their features of this batch, when already computed)."""
        return Context(Batch.of(batch), views, self.backbone, self.recipe.views, self.copies.by_term(),
                       self.copies.layers, target_cache)

    def embed(self, batch: Batch | Mapping, views: Views, target_cache: dict | None = None) -> tuple[Embeddings, dict]:
        """Every term's rows on ``batch`` (:meth:`Term.embed`) -> ({(term, direction): rows}, the
        target encoders' features; ``target_cache``: those already computed for this batch)."""
        ctx = self.context(batch, views, target_cache)
        rows = {(t.name, i): t.embed(ctx, s, u) for t in self.terms for i, (s, u) in enumerate(t.view_pairs())}
        return rows, ctx.target_cache

    def score(self, rows: Embeddings, share=whole) -> Losses:
        """Each term's value (summed over its directions), its samples and the weighted total."""
        terms, samples, total = {}, {}, 0.0
        for term in self.terms:
            loss, n = 0.0, 0
            for i in range(len(term.view_pairs())):  # one direction, or both (swap_views)
                emb = rows[term.name, i]
                loss, n = loss + term.score(emb, share), n + emb.samples
            terms[term.name], samples[term.name] = loss, n  # n: a number, or a device tensor (read when logged)
            total = total + term.cfg.weight * loss
        return Losses(total, terms, samples)

    def forward(self, batch: Batch | Mapping, views: Views | None = None,
                cache: EmbeddingCache | None = None) -> Losses | None:
        """The terms and their weighted total on ``batch`` as :meth:`stage` made it (a batch not
        staged is staged here, on its images' device). ``cache``: ``batch`` is one micro-batch of a
        larger one (:mod:`m3i.train.accumulation`); the outputs are those of the larger batch, with
        gradient through this micro-batch (None while the cache fills: it keeps the rows)."""
        batch = Batch.of(batch)
        if not batch.staged:
            batch = self.stage(batch, batch.device, views=views is None)
        rows, features = self.embed(batch, views or self.views_of(batch), None if cache is None else cache.target_cache)
        if cache is None:
            return self.score(rows)
        if cache.filling:
            cache.keep(rows, features)
            return None
        return self.score(cache.splice(rows), cache.share)

    def prepare(self, data, progress: bool = True) -> None:
        """Work each target does once before training, on the data (``captions()``) it will see."""
        for term in self.terms:
            term.target.prepare(term, data, progress=progress)

    # -- the parts' own, read through the objective ---------------------------------------------
    augment, masked_views, visible_count = _of("view_stage", "augment", "masked_views", "visible_count")
    loader_views, views_of, make_views = _of("view_stage", "loader_views", "views_of", "make_views")
    image_mean, image_std, normalize = _of("view_stage", "image_mean", "image_std", "normalize")
    encoders, sync_teacher = _of("copies", "encoders", "sync")

    def update_teacher(self, step: int, total_steps: int, skip: Tensor | None = None) -> float | None:
        """After the optimiser step that makes ``step`` steps done: each target's own update
        (``Target.after_step``: step counters, and a teacher's centre), then the EMA teacher's step
        (which copies the online buffers); the centre and the teacher stay as they were when the 0-d
        bool ``skip`` is true, decided on the device. Returns the teacher's momentum (None: no teacher)."""
        for term in self.terms:
            term.target.after_step(term, step, skip)
        return self.copies.update(step, total_steps, skip)

    # -- state ---------------------------------------------------------------------------------
    def unsaved_keys(self) -> set[str]:
        """State a checkpoint leaves out: what each module says comes from elsewhere
        (``unsaved_state_keys()``: a frozen text tower's package, a frozen model's file)."""
        return {f"{name}.{k}" for name, m in self.named_modules() if hasattr(m, "unsaved_state_keys")
                for k in m.unsaved_state_keys()}

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
    def caption_term(self) -> Term | None:
        """The term whose target is a text's embedding (``Target.pairs_with_text``), if any."""
        return next((t for t in self.terms if t.target.pairs_with_text), None)

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
        return term.target.encode(term, captions)


def online_backbone(recipe: Recipe, backbone: Backbone | None = None) -> Backbone:
    """The recipe's online backbone (or ``backbone``), checked against its masked views' input mode."""
    bcfg, mode = recipe.backbone, recipe.views.input_mode
    net = backbone or build_backbone(bcfg.name, **bcfg.kwargs(), **({"fill": True} if mode == "fill" else {}))
    if any(t.source.masked for t in recipe.terms) and mode == "drop" and not net.supports_drop:
        raise ValueError(f"views.input_mode: {bcfg.name} is convolutional and cannot drop masked tokens; "
                         f"use views.input_mode=fill (a learned mask token) or views.input_mode=mix (two images "
                         f"share one canvas)")
    if bcfg.grad_checkpointing:
        net.set_grad_checkpointing(True)
    return net


__all__ = ["EmbeddingCache", "Objective", "Term", "Context", "Views", "to_device"]
