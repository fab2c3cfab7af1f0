"""Exact gradient accumulation (``train.accum_steps``): a training step in K micro-batches of B/K
gives the loss, every term and the gradient of every trainable parameter of the same step on one
batch of B (fp32, CPU), for every recipe: contrastive terms over the batch (CLIP's both
directions, SimCLR's NT-Xent, MoCo v3), class tables with learned temperatures, UniGrad's
correlation, the mixed input's canvases. The reference is today's one-pass step (K = 1). That
the accumulated step issues no host sync: tests/train/test_host_sync.py."""
from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from m3i.batch import Losses
from m3i.config import check_accum_steps
from m3i.train.accumulation import MicroBatches, micro_rows
from m3i.config import ConfigError, load_recipe, recipe_names
from m3i.objective import Objective
from m3i.train import loop
from m3i.train.step import BadSteps, TrainStep, make_optimizer

from test_equivalence import make_batch, perturb_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

B = 8
CPU = torch.device("cpu")
# every recipe shrunk to a ViT of 2 blocks, 32 wide, at 32 px (the scale recipes too: only sizes
# change); the CPU m3i recipe keeps its ResNet (the mixed input pasted on one canvas)
BASE = [f"data.batch_size={B}", "data.image_size=32", "data.num_workers=0", "train.precision=fp32",
        "train.clip_grad=0", "train.min_lr=0", "backbone.drop_path_rate=0.0"]
VIT = ["backbone.name=vit_nano", "backbone.depth=2", "backbone.embed_dim=32", "backbone.num_heads=2",
       "backbone.patch_size=8", "backbone.img_size=32"]


def small(widths: list[int], last: int = 32) -> str:
    return "[" + ", ".join(["48"] * (len(widths) - 1) + [str(last)]) + "]" if widths else "[]"


def shrink(name: str) -> list[str]:
    """Overrides that make ``name`` a few-thousand-parameter model (same parts, same code path)."""
    recipe = load_recipe(name)
    out = BASE + ([] if recipe.backbone.name.startswith("resnet") else VIT)
    top_k = max(getattr(t.target_encoder, "top_k", 0) for t in recipe.terms)
    out += [f"backbone.depth={top_k}"] if top_k > 2 else []  # data2vec's average of the top blocks
    out += ["views.local.size=16"] if recipe.views.local is not None else []  # multi-crop: 2 × 2 patches
    for i, t in enumerate(recipe.terms):
        if t.target.kind == "caption":  # a small text tower trained from scratch
            out += [f"terms.{i}.target_encoder.tower=scratch", f"terms.{i}.target_encoder.width=16",
                    f"terms.{i}.target_encoder.depth=1", f"terms.{i}.target_encoder.heads=2",
                    f"terms.{i}.target_encoder.trainable=true"]
        if t.decoder.kind == "dense":
            out += [f"terms.{i}.decoder.width=32", f"terms.{i}.decoder.heads=2", f"terms.{i}.decoder.depth=1",
                    f"terms.{i}.decoder.projector_depth={min(1, t.decoder.projector_depth)}"]
        elif t.decoder.kind == "text":  # a captioning term's text decoder
            out += [f"terms.{i}.decoder.width=32", f"terms.{i}.decoder.heads=2", f"terms.{i}.decoder.depth=1"]
        elif t.decoder.kind == "prototypes":  # a prototype head of few prototypes
            out += [f"terms.{i}.decoder.hidden=[48]", f"terms.{i}.decoder.bottleneck=16",
                    f"terms.{i}.decoder.prototypes=64"]
        elif getattr(t.decoder, "projector", None):
            out += [f"terms.{i}.decoder.projector={small(t.decoder.projector)}",
                    f"terms.{i}.decoder.predictor={small(t.decoder.predictor)}"]
    return out


def small_objective(name: str, extra: tuple[str, ...] = ()) -> Objective:
    recipe = load_recipe(name, overrides=shrink(name) + list(extra))
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=10).train()
    if obj.teacher is not None:
        perturb_teacher(obj)
    with torch.no_grad():  # temperatures and class biases off their initial values
        for t in obj.terms:
            if isinstance(t.log_scale, torch.nn.Parameter):
                t.log_scale.add_(0.3)
        for n, p in obj.named_parameters():
            if n.endswith("classes.bias"):
                p.normal_()
    return obj


def batch_norms(obj) -> list[_BatchNorm]:
    return [m for m in obj.modules() if isinstance(m, _BatchNorm)]


def train_step(obj: Objective, k: int) -> TrainStep:
    train = obj.recipe.train.model_copy(update={"accum_steps": k})
    opt = make_optimizer(obj.param_groups(train.weight_decay), train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.lr_lambda(train))
    return TrainStep(obj, obj, opt, sched, train, nullcontext(), BadSteps(CPU))


def step_and_grads(obj: Objective, staged: dict, k: int, seed: int = 7):
    """One training step of ``staged`` in ``k`` micro-batches -> (outputs, the gradient of every
    trainable parameter; the step leaves it in ``.grad``: clip_grad=0 only measures its norm)."""
    step = train_step(obj, k)
    torch.manual_seed(seed)
    out = step(staged, 0)
    assert step.bad.read()[0] == 0
    return out, {n: p.grad.clone() for n, p in obj.named_parameters() if p.requires_grad}


def assert_close_grads(ref: dict, got: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert set(got) == set(ref)
    scale = max(float(g.abs().max()) for g in ref.values())
    assert scale > 0
    assert any(n.startswith("backbone.") and float(g.norm()) > 0 for n, g in ref.items())
    for name, g in ref.items():
        err = float((got[name] - g).abs().max())
        assert torch.allclose(got[name], g, rtol=rtol, atol=atol * scale), \
            f"{name}: max |Δgrad| {err:.3g}, max |grad| {float(g.abs().max()):.3g}"


def assert_same_outputs(ref: Losses, got: Losses) -> None:
    assert set(got.terms) == set(ref.terms) and set(got.samples) == set(ref.samples)
    pairs = [("loss", ref.loss, got.loss)] + [(f"{k} of {n}", a[n], b[n]) for k, a, b in
                                              (("value", ref.terms, got.terms), ("samples", ref.samples, got.samples))
                                              for n in a]
    for key, value, mine in pairs:
        torch.testing.assert_close(torch.as_tensor(mine).float(), torch.as_tensor(value).float(),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


CPU_RECIPES = [n for n in recipe_names() if not n.endswith(("-vitb16", "-vitl16", "-vitl14"))]
SCALE_RECIPES = [n for n in recipe_names() if n.endswith(("-vitb16", "-vitl16", "-vitl14"))]


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("name", CPU_RECIPES + SCALE_RECIPES)
def test_micro_batches_give_the_loss_and_gradients_of_the_whole_batch(name, k):
    obj = small_objective(name)
    # a batch norm normalises each micro-batch by its own statistics, which cannot equal the whole
    # batch's: with its statistics fixed (eval mode) everything else must be equal
    for m in batch_norms(obj):
        m.eval()
    torch.manual_seed(1)
    staged = obj.stage(make_batch(B, 1), CPU)  # labels missing on 3 rows, captions on 2
    one = copy.deepcopy(obj)
    ref_out, ref = step_and_grads(one, staged, 1)
    out, got = step_and_grads(obj, staged, k)
    assert_same_outputs(ref_out, out)
    assert_close_grads(ref, got)
    # and the step taken from them: AdamW's first step is ±lr wherever a gradient is not ~0
    for (n, p), q in zip(obj.named_parameters(), one.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2 * obj.recipe.train.lr, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", CPU_RECIPES)
def test_the_objective_is_each_terms_own_loss_weighted_and_summed_bit_for_bit(name):
    """The forward pass (every term's rows, then their scores) gives each term exactly the loss
    the term computes alone (``Term.forward``: its rows, then its estimator, direction by direction),
    the same samples, the weighted sum of them, and the same gradients, to the last bit."""
    obj = small_objective(name)
    torch.manual_seed(1)
    batch = obj.stage(make_batch(8, 1), CPU)
    views = obj.views_of(batch)
    torch.manual_seed(2)
    out = obj(batch, views)
    grads = torch.autograd.grad(out.loss, [p for p in obj.parameters() if p.requires_grad], allow_unused=True)
    torch.manual_seed(2)
    ctx = obj.context(batch, views)
    total = 0.0
    for term in obj.terms:
        loss, n = 0.0, 0
        for s, t in term.view_pairs():
            loss_st, n_st = term(ctx, s, t)
            loss, n = loss + loss_st, n + n_st
        assert torch.equal(out.terms[term.name], loss) and int(out.samples[term.name]) == int(n), term.name
        assert out[term.name] is out.terms[term.name] and out["n_" + term.name] is out.samples[term.name]
        total = total + term.cfg.weight * loss
    assert torch.equal(out.loss, total) and out["loss"] is out.loss
    ref = torch.autograd.grad(total, [p for p in obj.parameters() if p.requires_grad], allow_unused=True)
    assert all((a is None) == (b is None) and (a is None or torch.equal(a, b)) for a, b in zip(grads, ref))


def test_stochastic_depth_is_replayed_in_the_pass_with_gradient():
    """With drop-path, each micro-step's fresh rows are the kept ones (the same random draw), and
    the run's random stream continues where the pass without gradient left it."""
    obj = small_objective("clip", ("backbone.drop_path_rate=0.5",))
    torch.manual_seed(3)
    staged = obj.stage(make_batch(B, 3), CPU)
    micro = MicroBatches(obj, staged, 2)
    after = torch.get_rng_state()
    for part, views in micro:
        fresh, _ = obj.embed(part, views, micro.target_cache)
        for key, emb in fresh.items():
            torch.testing.assert_close(emb.pred, micro.embeddings[micro.slot][key].pred, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), after)
    # run again without the replay, the same micro-batch draws other paths: the replay makes them equal
    kept = micro.embeddings[0][("caption", 0)].pred
    assert not torch.allclose(kept, obj.embed(*micro.parts[0])[0][("caption", 0)].pred)


def test_batch_norm_statistics_move_once_per_micro_batch():
    obj = small_objective("simclr")
    norms = batch_norms(obj)
    assert norms
    staged = obj.stage(make_batch(B, 0), CPU)
    obj(staged)
    per_forward = [int(m.num_batches_tracked) for m in norms]  # SimCLR's projector runs on both views
    one = copy.deepcopy(obj)
    _, ref = step_and_grads(one, staged, 1)
    _, got = step_and_grads(obj, staged, 2)
    # one forward before, then the 2 micro-batches once each: the pass without gradient puts them back
    assert [int(m.num_batches_tracked) for m in norms] == [3 * c for c in per_forward]
    # and the gradients differ from the whole batch's: per-micro-batch statistics, as the docs say
    assert any(float((got[n] - g).norm()) > 1e-3 * float(g.norm()) for n, g in ref.items())


def test_micro_batches_are_slices_and_the_mixed_input_keeps_each_canvas_whole():
    assert micro_rows(8, 4, paired=False) == [(slice(0, 2),), (slice(2, 4),), (slice(4, 6),), (slice(6, 8),)]
    assert micro_rows(8, 2, paired=True) == [(slice(0, 2), slice(4, 6)), (slice(2, 4), slice(6, 8))]
    obj = small_objective("m3i")
    staged = obj.stage(make_batch(B, 2), CPU)
    micro = MicroBatches(obj, staged, 2)
    (p0, v0), (p1, v1) = micro.parts
    assert torch.equal(p1["label"], staged["label"][[2, 3, 6, 7]])
    assert p1["caption"] == [staged["caption"][i] for i in (2, 3, 6, 7)]
    views = obj.make_views(staged["image"], staged["drawn"])
    for v in range(2):
        assert torch.equal(v0.images[v], views.images[v][[0, 1, 4, 5]])
    for v, vis in views.visible.items():  # each canvas's two images show disjoint patches
        assert not (v1.visible[v][:2] & v1.visible[v][2:]).any()
        assert torch.equal(v1.visible[v], vis[[2, 3, 6, 7]])


def test_accum_steps_must_divide_the_batch_of_each_rank():
    with pytest.raises(ConfigError, match="train.accum_steps: 3 micro-batches do not divide data.batch_size 8"):
        load_recipe("simclr", overrides=["data.batch_size=8", "train.accum_steps=3"])
    with pytest.raises(ConfigError, match=r"train.accum_steps: Input should be greater than or equal to 1"):
        load_recipe("simclr", overrides=["train.accum_steps=0"])
    with pytest.raises(ConfigError, match="train.accum_steps: 4 micro-batches do not divide half of data.batch_size 12"):
        load_recipe("m3i", overrides=["data.batch_size=12", "train.accum_steps=4"])
    # the global batch splits, the batch of each rank does not: refused when the ranks are known
    with pytest.raises(ValueError, match=r"train.accum_steps: 4 micro-batches do not divide the batch of each of the "
                                         r"2 ranks \(6 = data.batch_size 12 / 2\)"):
        check_accum_steps(4, 12, 2, paired=False)
    check_accum_steps(4, 16, 2, paired=False)
    assert load_recipe("simclr", overrides=["data.batch_size=8", "train.accum_steps=4"]).train.accum_steps == 4


def test_a_target_with_a_one_call_loss_is_refused_in_micro_batches():
    from m3i.targets.view import View

    obj = small_objective("simclr")

    class OneCall(View):  # a plugin's kind written against the one-call API: its own loss
        def loss(self, term, ctx, s, t):
            return super().loss(term, ctx, s, t)

    obj.terms[0].target = OneCall()
    obj(make_batch(B, 0))  # one pass trains as before
    with pytest.raises(ValueError, match="train.accum_steps: the 'view' target of term 'view' computes its loss in one call"):
        MicroBatches(obj, make_batch(B, 0), 2)
