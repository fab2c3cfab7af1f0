"""A training step with multi-crop's local crops and DINOv2's masks (rows that hide different numbers
of patches, the fill input): in K micro-batches it gives the loss and gradients of one pass, and it
never makes the host wait for the device."""
from __future__ import annotations

import copy

import pytest
import torch

from host_sync import HostSyncs
from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.train import loop
from m3i.train.accumulation import MicroBatches
from m3i.train.step import BadSteps, TrainStep, make_optimizer
from test_accumulation import B, CPU, assert_close_grads, assert_same_outputs, batch_norms, small_objective, step_and_grads
from test_equivalence import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")

# two 16-px local crops beside the two 32-px global views; the term's target is local crop 2
LOCAL = ("views.local={count: 2, size: 16}", "terms.0.target.view=2")
VARYING = ("terms.0.source.masked=true", "views.input_mode=fill", "views.mask.ratio=[0.2, 0.6]",
           "views.mask.probability=0.5")
CASES = {"local": LOCAL, "local+varying masks": LOCAL + VARYING,
         "local, 3 crops, view 4": ("views.local={count: 3, size: 16}", "terms.0.target.view=4")}


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_micro_batches_with_local_crops_give_the_whole_batch(case, k):
    obj = small_objective("simclr", CASES[case])
    for m in batch_norms(obj):  # the projector's batch norm: statistics fixed, as the accumulation tests do
        m.eval()
    torch.manual_seed(1)
    staged = obj.stage(make_batch(B, 1), CPU)
    assert len(staged.drawn.views) == obj.recipe.views.total
    one = copy.deepcopy(obj)
    ref_out, ref = step_and_grads(one, staged, 1)
    out, got = step_and_grads(obj, staged, k)
    assert_same_outputs(ref_out, out)
    assert_close_grads(ref, got)


def test_micro_batches_cut_every_view_and_the_masks():
    obj = small_objective("simclr", LOCAL + VARYING)
    staged = obj.stage(make_batch(B, 2), CPU)
    views = obj.views_of(staged)
    micro = MicroBatches(obj, staged, 2)
    for j, (_, part) in enumerate(micro.parts):
        rows = slice(j * B // 2, (j + 1) * B // 2)
        assert len(part.images) == 4 and [x.shape[-1] for x in part.images] == [32, 32, 16, 16]
        assert all(torch.equal(a, b[rows]) for a, b in zip(part.images, views.images))
        assert torch.equal(part.visible[0], views.visible[0][rows]) and part.count == 16  # every patch: 4 × 4


HOST_CASES = {
    "vit": ["backbone.name=vit_nano", "backbone.depth=2", *LOCAL, *VARYING],
    "convnext": ["backbone.name=convnext_atto", *LOCAL, *VARYING],  # 8-px final stride: 4 × 4 and 2 × 2 grids
}


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("case", ["vit", "convnext"])
def test_a_multicrop_step_never_waits_for_the_device(case, accum):
    recipe = load_recipe("simclr", overrides=["data.batch_size=8", "data.num_workers=0", f"train.accum_steps={accum}"]
                         + HOST_CASES[case])
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=10)
    opt = make_optimizer(obj.param_groups(recipe.train.weight_decay), recipe.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.lr_lambda(recipe.train))
    step = TrainStep(obj, obj, opt, sched, recipe.train, torch.autocast("cpu", dtype=torch.bfloat16),
                     BadSteps(CPU))
    step(obj.stage(make_batch(8, 0), CPU), 0)  # the optimiser's state is created
    staged = obj.stage(make_batch(8, 1), CPU)
    assert any(bool((m.sum(1) != m.sum(1)[0]).any()) for m in staged.drawn.visible.values())  # the rows differ
    with HostSyncs() as syncs:
        out = step(staged, 1)
    assert syncs.total == 0, dict(syncs.counts)
    assert torch.isfinite(out["loss"]).item() and step.bad.read()[0] == 0
