"""Self-distillation in the trainer's step: no host sync, exact accumulation (the teacher's centre
moved once, by the whole batch), the dry run's FLOPs against a hand count (local crops included),
and a resumed run that keeps the centre, the temperature's and the frozen prototypes' counters."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.train import loop
from m3i.train.dryrun import step_flops
from m3i.train.step import BadSteps, TrainStep, make_optimizer
from conftest import killed_and_resumed, needs_data
from host_sync import HostSyncs
from test_dryrun import resnet_forward
from test_accumulation import assert_close_grads, assert_same_outputs, batch_norms, small_objective, step_and_grads
from test_equivalence import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
SMALL_HEADS = ["terms.0.decoder.hidden=[48]", "terms.0.decoder.bottleneck=16", "terms.0.decoder.prototypes=64"]
# dinov2 with its iBOT head separate and centred by the EMA of its mean: every kind of state
SEPARATE = ["terms.1.decoder={kind: prototypes, hidden: [48], bottleneck: 16, prototypes: 32, freeze_last_layer: 3}",
            "terms.1.target_encoder.centring=ema"]


def centres(obj: Objective) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in obj.state_dict().items() if k.endswith(("centring.center", ".step"))}


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("name,extra", [("dino", []), ("dinov2", []), ("dinov2", SEPARATE)])
def test_a_distillation_step_never_waits_for_the_device(name, extra, accum):
    recipe = load_recipe(name, overrides=["data.batch_size=8", "views.local.count=2", *SMALL_HEADS, *extra,
                                          f"train.accum_steps={accum}"])
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=10)
    opt = make_optimizer(obj.param_groups(recipe.train.weight_decay), recipe.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.lr_lambda(recipe.train))
    step = TrainStep(obj, obj, opt, sched, recipe.train, torch.autocast("cpu", dtype=torch.bfloat16), BadSteps(CPU))
    step(obj.stage(make_batch(8, 0), CPU), 0)
    staged = obj.stage(make_batch(8, 1), CPU)
    before = centres(obj)
    with HostSyncs() as syncs:
        out = step(staged, 1)
    assert syncs.total == 0, dict(syncs.counts)
    assert torch.isfinite(out.loss).item() and step.bad.read()[0] == 0
    after = centres(obj)
    assert all(int(after[k]) == 2 for k in after if k.endswith(".step"))  # the counters follow the steps
    moved = [k for k in after if k.endswith("center") and not torch.equal(after[k], before[k])]
    assert len(moved) == sum(t.cfg.target_encoder.centring == "ema" for t in obj.terms if hasattr(t, "centring"))


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("name,extra", [("dino", []), ("dinov2", SEPARATE)])
def test_micro_batches_move_the_centre_once_by_the_whole_batch(name, extra, k):
    obj = small_objective(name, tuple(extra))
    for m in batch_norms(obj):  # the ResNet's batch norm in eval mode (test_accumulation: the one inexact part)
        m.eval()
    torch.manual_seed(1)
    staged = obj.stage(make_batch(8, 1), CPU)
    one = copy.deepcopy(obj)
    ref_out, ref = step_and_grads(one, staged, 1)
    out, got = step_and_grads(obj, staged, k)
    assert_same_outputs(ref_out, out)
    assert_close_grads(ref, got)
    want, have = centres(one), centres(obj)
    assert set(want) == set(have) and any(k.endswith("center") for k in want)
    for key in want:
        torch.testing.assert_close(have[key], want[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", ["dino", "dinov2"])
def test_the_dry_run_counts_every_crop_the_teacher_and_the_heads(name):
    """By hand: the student's forward and backward on 2 global crops of 32 px and the local crops
    of 16 (the backward twice the forward, less the stem's input gradient), the teacher's forward on
    the global crops; the prototype head (128 → 512 → 512 → 128 → 1,024) on every student crop with
    its backward and on the teacher's crops; DINO's cross-entropy of every crop pair (G·V·K
    multiply-adds); for dinov2 the shared head at the 8 patches a mask hides at most (half of 16)
    of each global crop, student and teacher."""
    recipe = load_recipe(name)
    (f32, s32), (f16, s16) = resnet_forward(32), resnet_forward(16)
    g, local, k = 2, recipe.views.local.count, 1024
    v = g + local
    head = 2 * (128 * 512 + 512 * 512 + 512 * 128) + 2 * 128 * k
    want = g * (3 * f32 - s32) + local * (3 * f16 - s16) + g * f32 + v * 3 * head + g * head + 3 * 2 * g * v * k
    if name == "dinov2":
        masked = 8
        want += g * masked * 4 * head
    assert step_flops(recipe, 0, batch=4) / 4 == pytest.approx(want, rel=0.05)


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@needs_data
def test_a_resumed_run_keeps_the_centres_and_the_counters(tmp_path, monkeypatch):
    """Killed after the step-2 checkpoint and resumed: the same losses at steps 3 and 4 (the
    prototypes unfrozen at step 3, the temperature still warming up) and the same final centres and
    counters as the run that was never stopped."""
    recipe = load_recipe("dinov2", overrides=[
        "data.batch_size=8", "data.num_workers=0", "train.steps=4", "train.ckpt_every=2", "train.log_every=1",
        "train.warmup_steps=1", "views.local.count=2", "data.sources=[{spec: fashion-mnist}]", *SMALL_HEADS, *SEPARATE,
        "terms.0.target_encoder.warmup_steps=8", "terms.1.target_encoder.warmup_steps=8"])
    full_ckpt = loop.pretrain(recipe, tmp_path / "a", progress=False)
    resumed_ckpt = killed_and_resumed(monkeypatch, recipe, tmp_path / "b", 2)
    full, resumed = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for term in ("dino", "ibot", "koleo"):
            assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-6), (a["step"], term)
    want, got = load_file(full_ckpt / "model.safetensors"), load_file(resumed_ckpt / "model.safetensors")
    kept = [k for k in want if k.endswith(("centring.center", "centring.step", "decoder.step"))]
    assert len(kept) == 6  # two centres, two temperature counters, two heads' counters
    for key in kept:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)
    assert int(want["terms.0.decoder.step"]) == 4 and float(want["terms.1.centring.center"].abs().sum()) > 0
