"""What every kind of target answers to, and the flow shared by the dense ones."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..backbones import Backbone, visible_indices
from ..decoders import DECODERS
from ..decoders.prototypes import link_shared_heads, shared_width
from ..estimators import ESTIMATORS, FORMS
from ..registry import Registry
from ..schema import Strict
from ..batch import Batch
from ..terms import Context, Embedding, Pair, Term, whole
from ..views import absolute_positions, relative_positions


class TargetCfg(Strict):
    kind: str


class Target:
    """A kind of target z of a term I(ẑ; z): what the term predicts and from which view.

    A target kind names the target encoders it can be read with (``encoders``), the shape in
    which an estimator sees it (``form``: one of :data:`m3i.estimators.FORMS`), builds the modules
    it owns (:meth:`build`) and computes the term (:meth:`loss`) from the term (its decoder,
    estimator and those modules, :class:`m3i.terms.Term`) and the step's shared context (views,
    online and target-encoder features, :class:`m3i.terms.Context`), in two halves: the rows'
    predictions and targets (:meth:`embed`), then the estimator over them (:meth:`score`). A kind
    that implements both (every built-in one) trains in micro-batches (``train.accum_steps``)
    exactly; one that overrides :meth:`loss` alone trains in one pass only.
    """

    kind: ClassVar[str]
    Config: ClassVar[type[TargetCfg]]
    form: ClassVar[str]
    encoders: ClassVar[tuple[str, ...]]
    views_cfg = None  # the recipe's ``views`` (a ViewsCfg), given by build_term
    image: ClassVar[bool] = False  # the target is an image view (``target.view`` names it)
    needs: ClassVar[str | None] = None  # the annotation the target is read from: "labels", "captions" or none
    # the target is a text's embedding: the term embeds images and texts in one space
    # (``encode(term, captions)``), as zero-shot classification and retrieval read them
    pairs_with_text: ClassVar[bool] = False

    @classmethod
    def check_data(cls, term, sources) -> None:
        """Raise ValueError when no source of the data (``Source`` objects) carries what this
        target is read from: the term would train on nothing at every step."""
        if cls.needs is None or any(getattr(s, f"has_{cls.needs}") for s in sources):
            return
        why = "; ".join(f"{s.name}: {_lacks(s, cls.needs)}" for s in sources)
        raise ValueError(f"a {cls.kind!r} target is read from {cls.needs}, and no source of data.sources has "
                         f"{cls.needs} ({why}); add a source with {cls.needs} or leave the term out")

    @classmethod
    def check(cls, term) -> None:
        """Raise ValueError, naming the field, when ``term`` (a TermCfg) combines parts that do
        not fit this kind of target."""
        enc = term.target_encoder.kind
        if enc not in cls.encoders:
            raise ValueError(f"target_encoder.kind: a {cls.kind!r} target needs "
                             f"{' or '.join(repr(e) for e in cls.encoders)}, got {enc!r}")
        if cls.form not in DECODERS[term.decoder.kind].forms:
            fit = [k for k in DECODERS.kinds() if cls.form in DECODERS[k].forms]
            raise ValueError(f"decoder.kind: a {cls.kind!r} target ({FORMS[cls.form]}) needs the "
                             f"{' or '.join(repr(k) for k in fit)} decoder")
        ESTIMATORS[term.estimator.kind].check(term, cls.form)

    @classmethod
    def check_views(cls, term, views) -> None:
        """Raise ValueError when ``term`` does not fit the recipe's ``views`` (a ViewsCfg)."""

    @classmethod
    def views(cls, term, views_cfg) -> set[int]:
        """The views of the batch the term reads (``views_cfg``: the recipe's ``views``)."""
        used = {term.source.view} | ({term.target.view} if cls.image else set())
        return used | ({1 - v for v in used} if term.swap_views else set())

    @classmethod
    def masked_views(cls, term, views_cfg) -> set[int]:
        """The views the online encoder sees masked for this term (their masks are drawn with the batch)."""
        if not term.source.masked:
            return set()
        return {term.source.view} | ({1 - term.source.view} if term.swap_views else set())

    @classmethod
    def view_pairs(cls, term) -> list[tuple[int, int]]:
        """(source view, target view) of each direction the term is computed in: one, or both with
        ``swap_views`` (a target that is no image view takes its source view's place)."""
        s = term.source.view
        t = term.target.view if cls.image else s
        return [(s, t), (1 - s, 1 - t)] if term.swap_views else [(s, t)]

    @classmethod
    def describe(cls, term) -> str:
        """The target in the words of the special-case table."""
        raise NotImplementedError

    @classmethod
    def describe_input(cls, term, masked: str) -> str | None:
        """The input in the words of the special-case table, where this kind reads other views than
        ``source.view`` (``masked``: how the recipe's input mode words a masked view, "masked ");
        None: the source view."""
        return None

    def out_dim(self, cfg, backbone: Backbone) -> int | None:
        """The width of a dense decoder's predictions for the term ``cfg`` (None: a global
        decoder's own width)."""
        return None

    @classmethod
    def num_classes_in(cls, state: dict[str, Tensor], prefix: str) -> int:
        """The number of classes a term's saved ``state`` (keys under ``prefix``) was built for
        (0: this kind keeps no class table)."""
        return 0

    def build(self, cfg, width: int, backbone: Backbone, num_classes: int) -> dict[str, nn.Module]:
        """The modules this target owns (a class table, a text tower), by the names the term gives
        them; ``cfg``: the term's settings, ``width``: the width of the decoder's predictions."""
        return {}

    def prepare(self, term: Term, data, progress: bool = True) -> None:
        """Work done once before training (a frozen text tower embeds every caption of ``data``),
        with a progress bar where ``progress``."""

    def stage(self, term: Term, batch: Batch) -> dict[str, Tensor]:
        """What this target makes of a batch's host data on the CPU before the step (a caption's
        tokens); the step finds it on the device in ``ctx.batch.drawn.targets[term.name]``."""
        return {}

    @classmethod
    def in_one_call(cls) -> bool:
        """Whether this kind computes its loss in one call (its own :meth:`loss`) rather than as
        :meth:`embed` then :meth:`score`: it trains in one pass, not in micro-batches."""
        return cls.loss is not Target.loss or cls.embed is Target.embed or cls.score is Target.score

    def embed(self, term: Term, ctx: Context, s: int, t: int) -> Embedding:
        """The predictions from source view ``s`` and the targets of view ``t``, row by row."""
        raise NotImplementedError

    def score(self, term: Term, emb: Embedding, share: Callable[[Tensor], Tensor] = whole) -> Tensor:
        """The term's loss over a batch's embeddings. ``share`` is applied to every tensor read off
        the term's own parameters (temperature, class table) rather than from ``emb``."""
        raise NotImplementedError

    def loss(self, term: Term, ctx: Context, s: int, t: int) -> tuple[Tensor, int | Tensor]:
        """-> (the term's loss, the number of samples that carried this target: a number, or a
        device tensor when it depends on the data): :meth:`embed`, then :meth:`score`."""
        emb = self.embed(term, ctx, s, t)
        return self.score(term, emb), emb.samples

    def after_step(self, term: Term, step: int, skip: Tensor | None = None) -> None:
        """After the optimiser step that makes ``step`` steps done (once per step, micro-batches or
        not): what the term tracks across steps moves (a teacher's centre, a step counter).
        ``skip``: a 0-d bool tensor, true when the step was skipped (applied with ``torch.where``,
        never read by the host). By default the term's decoder's own ``after_step(step)``, if any
        (a prototype head's counter for its frozen prototypes)."""
        hook = getattr(getattr(term, "decoder", None), "after_step", None)
        if hook is not None:
            hook(step)


TARGETS: Registry[type[Target]] = Registry("target kind")


def build_term(cfg, backbone: Backbone, num_classes: int, views=None, cfgs: Sequence = ()) -> Term:
    """A term of the recipe: its target kind, estimator and decoder from the registries, the
    decoder's modules and the target's own (class table, text tower) built onto it. ``views``: the
    recipe's views; ``cfgs``: every term of the recipe (a decoder may be another term's head)."""
    target = TARGETS[cfg.target.kind]()
    target.views_cfg = views
    estimator = ESTIMATORS[cfg.estimator.kind](cfg.estimator)
    out_dim = target.out_dim(cfg, backbone)
    modules = cfg.decoder.build(backbone.embed_dim, out_dim)
    width = shared_width(cfg, cfgs) or cfg.decoder.width_of(backbone.embed_dim, out_dim)
    return Term(cfg, target, estimator, {**modules, **target.build(cfg, width, backbone, num_classes)})


def build_terms(cfgs: Sequence, backbone: Backbone, num_classes: int, views=None) -> list[Term]:
    """Every term of a recipe (``cfgs``), in order, each shared head linked to the term that owns it."""
    terms = [build_term(c, backbone, num_classes, views, cfgs) for c in cfgs]
    link_shared_heads(terms)
    return terms


def _lacks(source, needs: str) -> str:
    """Why ``source`` has no ``needs`` (labels or captions), for a message."""
    if not getattr(source, needs, True):
        return f"{needs} hidden ({needs}=false)"
    return (getattr(source, "unlabelled_note", None) if needs == "labels" else None) or f"no {needs}"


class DenseTarget(Target):
    """A target per patch: the masked source view's visible tokens are projected, and the decoder
    predicts one token per query (the masked patches of the same view, or every patch of the
    target view placed relative to the source view)."""

    form = "dense"
    image = True

    @classmethod
    def check_views(cls, term, views) -> None:
        if views.mask.varies:  # the decoder's queries are the hidden patches, the same number in every image
            raise ValueError(f"target.kind: a {cls.kind!r} target predicts the same number of hidden patches in every "
                             f"image; views.mask.ratio must be one number and views.mask.probability 1 (a range or "
                             f"a probability below 1 is for the 'dense_distill' target)")

    @classmethod
    def check(cls, term) -> None:
        super().check(term)
        if not hasattr(term.decoder, "queries"):
            raise ValueError(f"decoder.kind: a {cls.kind!r} target predicts through the queries of the 'dense' "
                             f"decoder, not {term.decoder.kind!r}")
        if not term.source.masked:
            raise ValueError("source.masked: a dense prediction needs a masked source view")
        if term.decoder.queries == "target_view" and term.target.view == term.source.view:
            raise ValueError("decoder.queries: 'target_view' queries need a target view other than the source view")
        if term.decoder.queries == "masked" and term.target.view != term.source.view:
            raise ValueError("decoder.queries: 'masked' queries predict the source view itself; "
                             "set target.view to source.view")

    def query_view(self, term: Term, s: int, t: int) -> int | Pair:
        """The view the queries sit on (a view index, or a pair in the mixed input)."""
        return t

    def dense_target(self, term: Term, ctx: Context, t: int | Pair, abs_pos: Tensor) -> Tensor:
        """(B, N, D) target tokens of view ``t`` at every patch."""
        raise NotImplementedError

    def embed(self, term, ctx, s, t):
        grid, decoder = ctx.grid_size, term.decoder
        feats = ctx.online(s, True)
        vis, k = ctx.visible(s), ctx.visible_count(s)
        vis_idx, hid_idx = visible_indices(vis, k), visible_indices(~vis, None if k is None else vis.shape[1] - k)
        abs_pos = absolute_positions(grid, device=vis.device)            # (N, 4)
        cls = feats.pooled if decoder.cls_token else None
        context = decoder.project(feats.tokens, abs_pos[vis_idx], cls=cls)
        if decoder.queries == "masked":
            qpos, sel = abs_pos[hid_idx], hid_idx
        else:
            t = self.query_view(term, s, t)
            _, box_s, flip_s = ctx.view(s)
            _, box_t, flip_t = ctx.view(t)
            qpos = relative_positions(box_s, flip_s, box_t, flip_t, grid)
            sel = None
        pred = decoder.predict(context, qpos, pos=abs_pos[vis_idx])
        target = self.dense_target(term, ctx, t, abs_pos)
        if sel is not None:
            target = torch.gather(target, 1, sel.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        return Embedding(pred.flatten(0, 1), target.flatten(0, 1).detach(), None, ctx.batch_size)

    def score(self, term, emb, share=whole):
        return term.estimator.dense(emb.pred, emb.target)
