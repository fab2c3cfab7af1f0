"""Self-distillation on 2 gloo ranks equals one process on the global batch: DINO's loss over every
crop pair, Sinkhorn–Knopp over the global batch, iBOT's patches under masks that differ per image,
KoLeo's nearest neighbours among every rank's rows; the gradients DDP averages, and the teacher's
centre after the step (its batch mean reduced over the ranks)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist

from m3i.config import load_recipe
from m3i.objective import Objective, Views
from m3i.train import strategy
from ranks import assert_grads_agree, assert_ranks_average_to, run_ranks

WORLD, B = 2, 4
SMALL = ["data.batch_size=8", "views.local.count=2", "terms.0.decoder.hidden=[48]", "terms.0.decoder.bottleneck=16",
         "terms.0.decoder.prototypes=64"]
CASES = {  # the CPU recipes (their ResNet: batch norm over the global batch under DDP)
    "dino": ("dino", SMALL),
    "dinov2": ("dinov2", SMALL + ["views.mask.probability=0.75"]),  # Sinkhorn-Knopp, a head shared with iBOT
    "dinov2_ema": ("dinov2", SMALL + ["terms.0.target_encoder.centring=ema", "terms.1.target_encoder.centring=ema",
                                      "terms.1.decoder={kind: prototypes, hidden: [48], bottleneck: 16, prototypes: 32}"]),
}


def case(name: str):
    """The objective (seed 0, its centres off zero), a global batch of WORLD·B images, its views and masks."""
    recipe, overrides = CASES[name]
    torch.manual_seed(0)
    obj = Objective(load_recipe(recipe, overrides=overrides)).train()
    with torch.no_grad():
        for t in obj.terms:
            if hasattr(t, "centring"):
                t.centring.center.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randint(0, 256, (WORLD * B, 3, 32, 32), dtype=torch.uint8, generator=g),
             "label": torch.full((WORLD * B,), -1), "caption": [None] * (WORLD * B)}
    torch.manual_seed(2)
    views = obj.views_of(obj.stage(batch, torch.device("cpu")))
    return obj, batch, views


def rank_slice(batch: dict, views: Views, r: int):
    rows = slice(r * B, (r + 1) * B)
    part = {k: v[rows] for k, v in batch.items()}
    return part, Views([x[rows] for x in views.images], [x[rows] for x in views.boxes], [x[rows] for x in views.flips],
                       {k: v[rows] for k, v in views.visible.items()}, views.count)


def centres(obj) -> dict:
    return {k: v.clone() for k, v in obj.named_buffers() if k.endswith("centring.center")}


def _worker(rank, inputs, out_dir):
    for name, path in inputs.items():
        saved = torch.load(path, weights_only=False)
        obj = Objective(load_recipe(CASES[name][0], overrides=CASES[name][1])).train()
        obj.load_state_dict(saved["state"])
        model = strategy.replicate(obj, torch.device("cpu"))
        out = model(*rank_slice(saved["batch"], saved["views"], rank))
        out.loss.backward()
        obj.update_teacher(1, 100, skip=torch.tensor(False))
        losses = [None] * WORLD
        tdist.all_gather_object(losses, {"loss": out.loss.item(), **{k: v.item() for k, v in out.terms.items()}})
        if rank == 0:  # DDP has averaged the gradients over the ranks
            torch.save({"losses": losses, "centres": centres(obj),
                        "grads": {k: p.grad for k, p in obj.named_parameters() if p.grad is not None}},
                       f"{out_dir}/{name}.out.pt")
        tdist.barrier()  # the ranks go on (and, after the last case, end) together


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """{case: (one process on the global batch, 2 ranks)}, from one spawn for every case."""
    tmp = tmp_path_factory.mktemp("distill_ranks")
    refs, inputs = {}, {}
    for name in CASES:
        obj, batch, views = case(name)
        torch.save({"state": obj.state_dict(), "batch": batch, "views": views}, tmp / f"{name}.pt")
        inputs[name] = str(tmp / f"{name}.pt")
        out = obj(batch, views)
        out.loss.backward()
        obj.update_teacher(1, 100, skip=torch.tensor(False))
        refs[name] = {"losses": {"loss": out.loss.item(), **{k: v.item() for k, v in out.terms.items()}},
                      "centres": centres(obj),
                      "grads": {k: p.grad for k, p in obj.named_parameters() if p.grad is not None}}
    run_ranks(_worker, inputs, str(tmp), world=WORLD)
    return {name: (refs[name], torch.load(tmp / f"{name}.out.pt", weights_only=False)) for name in CASES}


@pytest.mark.slow  # gloo ranks
@pytest.mark.parametrize("name", CASES)
def test_two_ranks_equal_one_process_on_the_global_batch(equivalence, name):
    ref, got = equivalence[name]
    assert_ranks_average_to(ref["losses"], got["losses"])  # DDP's mean over the ranks of each rank's share
    assert got["losses"][0]["loss"] != got["losses"][1]["loss"]  # the ranks saw different samples
    assert_grads_agree(ref["grads"], got["grads"])
    assert set(got["centres"]) == set(ref["centres"])
    for key, centre in ref["centres"].items():  # moved by the global batch's mean teacher score
        torch.testing.assert_close(got["centres"][key], centre, rtol=1e-5, atol=1e-6, msg=key)
