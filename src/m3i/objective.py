"""The objective: Σ_k λ_k · I(ẑ_k ; z_k), one mutual-information term per target.

A term = source view + target view + target encoder + decoder + estimator. The objective
owns the online backbone, the view stage (augment, masks) and the one EMA teacher shared by
every term whose target encoder is an EMA copy; it returns every term's value and the
weighted total. Nothing here knows a recipe: recipes are lists of terms in YAML.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as dist
from .backbones import Backbone, Features, build_backbone, visible_indices
from .config import Recipe, TermCfg
from .estimators import boltzmann, gaussian, target_correlation, unigrad
from .targets.decoders import DenseDecoder, MLPHead
from .targets.encoders import (ClassTable, Teacher, dense_target_norm, ema_momentum, pixel_target,
                               top_k_average)
from .views import ViewAugment, absolute_positions, block_mask, mix_visible, random_mask, relative_positions

IMAGE_TARGETS = ("view", "pixels")


@dataclass
class Views:
    """The augmented views of one batch and how each was made."""

    images: list[Tensor]   # each (B, C, S, S), normalised
    boxes: list[Tensor]    # each (B, 4): crop (i, j, h, w) in source pixels
    flips: list[Tensor]    # each (B,) bool
    visible: dict[int, Tensor] = field(default_factory=dict)  # (B, N) bool per masked view; drawn when absent


class Context:
    """Everything the terms of one step share, each piece computed once on first use."""

    def __init__(self, objective: "Objective", batch: dict, views: Views):
        self.obj, self.batch, self.views = objective, batch, views
        self.batch_size = views.images[0].shape[0]
        self._visible: dict[int, Tensor] = dict(views.visible)
        self._online: dict[tuple[int, bool], Features] = {}
        self._teacher: dict[tuple[str, int], Features] = {}

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
    def teacher(self, which: str, view: int | tuple) -> Features:
        key = (which, view)
        if key not in self._teacher:
            net: Teacher = getattr(self.obj, which)
            self._teacher[key] = net.backbone.forward_features(
                self.view(view)[0], return_layers=self.obj.teacher_layers)
        return self._teacher[key]


class Term(nn.Module):
    """One mutual-information term I(g_k(f_θ(t_s(x))) ; f_φ(t_t(x)))."""

    def __init__(self, cfg: TermCfg, backbone: Backbone, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.name = cfg.name
        tgt, enc, dec, est = cfg.target, cfg.target_encoder, cfg.decoder, cfg.estimator
        dim = backbone.embed_dim
        self.dense = tgt.kind == "pixels" or tgt.dense
        if self.dense:
            if tgt.kind == "pixels":
                out = backbone.patch_size ** 2 * backbone.in_chans
            else:
                out = dec.width if enc.head else dim
            self.decoder = DenseDecoder(dim, dec.width, dec.projector_depth, dec.depth, dec.heads, out)
        else:
            self.decoder = MLPHead(dim, dec.projector, dec.norm)
            self.predictor = MLPHead(self.decoder.out_dim, dec.predictor, dec.norm)
        if tgt.kind == "label":
            self.classes = ClassTable(num_classes, self.predictor.out_dim, enc.normalize, enc.bias)
        if tgt.kind == "caption":
            from .targets.text import build_text_tower

            if enc.tower == "minilm":
                tower = build_text_tower("minilm", trainable=enc.trainable)
            else:
                tower = build_text_tower("scratch", width=enc.width, depth=enc.depth)
            self.text = tower
            self.text_proj = nn.Linear(tower.out_dim, self.predictor.out_dim)
        scale = torch.tensor(math.log(1.0 / est.temperature))
        if est.learn_temperature:
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale, persistent=False)

    # -- pieces --------------------------------------------------------------------------
    @property
    def teacher_head(self) -> nn.Module | None:
        """The online head whose EMA copy the target passes through (projector of the term)."""
        if self.cfg.target_encoder.kind in ("ema", "frozen") and self.cfg.target_encoder.head:
            return self.decoder
        return None

    @property
    def target_net(self) -> str:
        """Attribute of the objective holding this term's copied target encoder."""
        return "teacher" if self.cfg.target_encoder.kind == "ema" else "frozen_" + self.name

    @property
    def temperature(self) -> Tensor:
        return 1.0 / self.log_scale.clamp(max=math.log(100.0)).exp()

    def zero(self, like: Tensor) -> Tensor:
        """A loss of 0 that still touches every trainable parameter (no NaN, no unused
        parameters under DDP) for a batch with no sample carrying this target."""
        z = like.sum() * 0.0
        for p in self.parameters():
            if p.requires_grad:
                z = z + p.sum() * 0.0
        return z

    def _pred_global(self, ctx: Context, view: int) -> Tensor:
        pooled = ctx.online(view, self.cfg.source.masked).pooled
        return self.predictor(self.decoder(pooled))

    def _target_global(self, ctx: Context, view: int) -> Tensor:
        enc = self.cfg.target_encoder
        if enc.kind == "online":
            return self.decoder(ctx.online(view, False).pooled)
        feats = ctx.teacher(self.target_net, view)
        if enc.head:
            with torch.no_grad():
                return getattr(ctx.obj, self.target_net).heads[self.name](feats.pooled)
        return feats.pooled

    # -- the term --------------------------------------------------------------------------
    def forward(self, ctx: Context, s: int, t: int) -> tuple[Tensor, int]:
        """-> (loss, number of samples that carried this target)."""
        kind = self.cfg.target.kind
        if kind == "label":
            return self._label(ctx, s)
        if kind == "caption":
            return self._caption(ctx, s)
        if not self.dense:
            return self._global_view(ctx, s, t)
        return self._dense(ctx, s, t)

    def _label(self, ctx: Context, s: int):
        label = ctx.batch["label"]
        rows = (label >= 0).nonzero().squeeze(1)
        pooled = ctx.online(s, self.cfg.source.masked).pooled
        # every rank counts the labelled rows of all ranks (a collective, so before any early return)
        n_all = int(dist.gather(torch.tensor([rows.numel()], device=label.device)).sum())
        if rows.numel() == 0:
            return self.zero(pooled), 0
        pred = self.predictor(self.decoder(pooled[rows]))
        if self.cfg.estimator.normalize:
            pred = F.normalize(pred, dim=-1)
        cand, bias = self.classes()
        # this rank's sum over (all labelled rows / ranks): DDP's mean over ranks is then the mean
        # over the global batch, whatever each rank drew
        loss = boltzmann(pred, cand, label[rows], self.temperature, bias=bias, reduction="sum")
        return loss * dist.world_size() / n_all, int(rows.numel())

    def _caption(self, ctx: Context, s: int):
        captions = ctx.batch["caption"]
        avail = torch.tensor([c is not None for c in captions], device=ctx.views.images[s].device)
        pooled = ctx.online(s, self.cfg.source.masked).pooled
        n = int(dist.gather(avail.long()).sum())
        if n == 0:
            return self.zero(pooled), 0
        pred = self.predictor(self.decoder(pooled))
        text = self.text([c if c is not None else "" for c in captions])
        target = self.text_proj(text.to(self.text_proj.weight.dtype))
        return self._batch_boltzmann(pred, target, avail), int(avail.sum())

    def _global_view(self, ctx: Context, s: int, t: int):
        pred = self._pred_global(ctx, s)
        target = self._target_global(ctx, t)
        est = self.cfg.estimator
        if est.kind == "gaussian":
            return gaussian(pred, target.detach() if self.cfg.target_encoder.kind != "online" else target,
                            normalize=est.normalize, reduce=est.reduce), pred.shape[0]
        avail = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
        return self._batch_boltzmann(pred, target, avail), pred.shape[0]

    def _batch_boltzmann(self, pred: Tensor, target: Tensor, avail: Tensor) -> Tensor:
        """Boltzmann over the global batch. ``candidates='batch'``: each prediction against
        every target (``directions=2`` adds targets against predictions, CLIP); ``'all'``:
        against every other prediction and target (NT-Xent)."""
        est = self.cfg.estimator
        if est.normalize:
            pred, target = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
        pred, target = pred.float(), target.float()
        b = pred.shape[0]
        all_pred, all_target = dist.gather_with_grad(pred), dist.gather_with_grad(target)
        all_avail = dist.gather(avail)
        cand = all_avail.nonzero().squeeze(1)
        index = torch.cumsum(all_avail.long(), 0) - 1      # position of each global row among the candidates
        rows = avail.nonzero().squeeze(1)
        pos = index[dist.rank() * b + rows]
        tau = self.temperature
        # this rank's sum over its anchors, over (global anchors / ranks): DDP's mean over ranks is the
        # mean over the global batch, also when ranks hold different numbers of anchors, or none (a sum
        # over no rows is 0 and still reaches the gathered tensors, whose backward is a collective)
        scale = dist.world_size() / max(cand.numel(), 1)
        if est.candidates == "batch":
            loss = boltzmann(pred[rows], all_target[cand], pos, tau, reduction="sum")
            if est.directions == 2:
                loss = (loss + boltzmann(target[rows], all_pred[cand], pos, tau, reduction="sum")) / 2
            return loss * scale
        m = cand.numel()
        z = torch.cat([all_pred[cand], all_target[cand]])
        anchors = torch.cat([pred[rows], target[rows]])
        self_idx = torch.cat([pos, pos + m])
        exclude = torch.zeros(anchors.shape[0], 2 * m, dtype=torch.bool, device=z.device)
        exclude[torch.arange(anchors.shape[0], device=z.device), self_idx] = True
        return boltzmann(anchors, z, torch.cat([pos + m, pos]), tau, exclude=exclude, reduction="sum") * scale / 2

    def _dense(self, ctx: Context, s: int, t: int):
        obj, enc, est = ctx.obj, self.cfg.target_encoder, self.cfg.estimator
        grid = obj.backbone.grid_size
        feats = ctx.online(s, True)
        vis = ctx.visible(s)
        vis_idx, hid_idx = visible_indices(vis), visible_indices(~vis)
        abs_pos = absolute_positions(grid, device=vis.device)            # (N, 4)
        context = self.decoder.project(feats.tokens, abs_pos[vis_idx])
        if self.cfg.decoder.queries == "masked":
            qpos, sel = abs_pos[hid_idx], hid_idx
        else:
            if self.cfg.target.paired:
                t = ("paired", s, t)
            _, box_s, flip_s = ctx.view(s)
            _, box_t, flip_t = ctx.view(t)
            qpos = relative_positions(box_s, flip_s, box_t, flip_t, grid)
            sel = None
        pred = self.decoder.predict(context, qpos)
        if self.cfg.target.kind == "pixels":
            target = pixel_target(ctx.views.images[t], obj.backbone.patch_size, enc.patch_norm)
        else:
            target = self._dense_target(ctx, t, abs_pos)
        if sel is not None:
            target = torch.gather(target, 1, sel.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        pred, target = pred.flatten(0, 1), target.flatten(0, 1).detach()
        if est.kind == "unigrad":
            return unigrad(pred, target, est.lam, target_correlation(target)), ctx.batch_size
        return gaussian(pred, target, normalize=False, reduce=est.reduce), ctx.batch_size

    @torch.no_grad()
    def _dense_target(self, ctx: Context, t: int | tuple, abs_pos: Tensor) -> Tensor:
        enc = self.cfg.target_encoder
        feats = ctx.online(t, False) if enc.kind == "online" else ctx.teacher(self.target_net, t)
        if enc.top_k:
            tokens = top_k_average(feats.layers[-enc.top_k:], enc.norm)
        else:
            tokens = feats.tokens
            if enc.head:
                tokens = getattr(ctx.obj, self.target_net).heads[self.name].project(tokens, abs_pos.unsqueeze(0))
            tokens = dense_target_norm(tokens, enc.norm)
        return tokens.float()


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
        self.teacher_layers = max([t.target_encoder.top_k for t in recipe.terms] + [0])
        heads = {t.name: t.teacher_head for t in self.terms
                 if t.cfg.target_encoder.kind == "ema" and t.teacher_head is not None}
        self.teacher = Teacher(self.backbone, heads) if any(
            t.target_encoder.kind == "ema" for t in recipe.terms) else None
        for t in self.terms:
            if t.cfg.target_encoder.kind == "frozen":
                self.add_module("frozen_" + t.name, load_frozen(t.cfg, self.backbone, t.teacher_head))

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
            loss, n = term(ctx, cfg.source.view, cfg.target.view if cfg.target.kind in IMAGE_TARGETS else cfg.source.view)
            if cfg.swap_views:
                loss2, n2 = term(ctx, 1 - cfg.source.view, 1 - cfg.target.view)
                loss, n = loss + loss2, n + n2
            out[term.name] = loss
            out["n_" + term.name] = torch.tensor(n)
            total = total + cfg.weight * loss
        out["loss"] = total
        return out

    def online_heads(self) -> dict[str, nn.Module]:
        return {t.name: t.teacher_head for t in self.terms if t.name in (self.teacher.heads if self.teacher else {})}

    @torch.no_grad()
    def update_teacher(self, step: int, total_steps: int, skip: Tensor | None = None) -> float | None:
        """EMA step of the teacher after an optimiser step (none when the 0-d bool ``skip`` is
        true: a skipped step); returns the momentum of the schedule."""
        if self.teacher is None:
            return None
        m = ema_momentum(step, total_steps, self.recipe.ema.momentum, self.recipe.ema.end)
        self.teacher.update(self.backbone, self.online_heads(), m, skip)
        return m


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
    missing, unexpected = teacher.backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "mask_token"]
    if missing or unexpected:
        raise ValueError(f"{enc.weights}: does not fit the frozen target encoder "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return teacher


__all__ = ["Objective", "Term", "Context", "Views"]
