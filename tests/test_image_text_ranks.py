"""The sigmoid and captioning terms on 2 gloo ranks equal one process on the global batch, loss and
gradients: each rank scores its own images against the captions of every rank (the sigmoid
estimator's all-gather with gradient), and each rank's share of the token cross-entropy is divided
by the global count of tokens. Also when one rank holds no caption at all. The global batch is
staged once (its captions tokenised, the rows predicted in parallel drawn) and each rank takes its
rows of it, as the loader hands each rank its part."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist

from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.train import strategy
from m3i.train.accumulation import take_batch, take_views
from ranks import assert_grads_agree, assert_ranks_average_to, run_ranks

WORLD, B = 2, 4
TOWER = ["terms.0.target_encoder.tower=scratch", "terms.0.target_encoder.width=16", "terms.0.target_encoder.depth=1",
         "terms.0.target_encoder.heads=2", "terms.0.target_encoder.trainable=true"]
TINY = ["backbone.name=vit_nano", "backbone.depth=2", "backbone.embed_dim=32", "backbone.num_heads=2", *TOWER]
DECODER = ["terms.1.decoder.width=32", "terms.1.decoder.heads=2", "terms.1.decoder.depth=1", "terms.1.decoder.max_length=8"]
CASES = {  # case: (recipe, overrides, rows of the global batch without a caption)
    "siglip": ("siglip", TINY, (1, B + 2)),
    "siglip_uneven": ("siglip", TINY, (0, 1, 2, 3, 5)),  # rank 0 holds no caption, rank 1 three
    "coca_uneven": ("coca", TINY + DECODER + ["terms.1.target.parallel=0.5"], (0, 1, 2, 3, 5)),
}
WORDS = ["red apple", "two small cats on a mat", "boat", "an old brass key", "blue car", "tree", "sun", "moon"]


def case_recipe(name: str):
    recipe, overrides, _ = CASES[name]
    return load_recipe(recipe, overrides=overrides)


def make_case(name: str):
    """The objective (its learned values off their initial ones), the staged global batch, its views."""
    torch.manual_seed(0)
    obj = Objective(case_recipe(name))
    with torch.no_grad():
        for term in obj.terms:
            if isinstance(term.log_scale, torch.nn.Parameter):
                term.log_scale.add_(0.3)
            if hasattr(term.decoder, "head"):  # the output layer starts at zero: give the decoder a gradient
                term.decoder.head.weight.normal_(std=0.05)
        if hasattr(obj.terms[0].estimator, "bias"):
            obj.terms[0].estimator.bias.fill_(-3.0)
    n = WORLD * B
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
             "label": torch.full((n,), -1), "caption": [None if i in CASES[name][2] else WORDS[i] for i in range(n)]}
    torch.manual_seed(2)
    staged = obj.stage(batch, torch.device("cpu"))
    return obj, staged, obj.views_of(staged)


def _worker(rank, inputs, out_dir):
    for name, path in inputs.items():
        case = torch.load(path, weights_only=False)
        obj = Objective(case_recipe(name))
        obj.load_state_dict(case["state"])
        model = strategy.replicate(obj, torch.device("cpu"))
        rows = (slice(rank * B, (rank + 1) * B),)
        out = model(take_batch(case["batch"], rows, WORLD * B), take_views(case["views"], rows))
        out.loss.backward()
        losses = [None] * WORLD
        tdist.all_gather_object(losses, {k: float(v.detach()) for k, v in {"loss": out.loss, **out.terms}.items()})
        if rank == 0:  # DDP has averaged the gradients over the ranks
            torch.save({"losses": losses, "grads": {k: p.grad for k, p in obj.named_parameters() if p.grad is not None}},
                       f"{out_dir}/{name}.out.pt")


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image_text_ranks")
    refs, inputs = {}, {}
    for name in CASES:
        obj, staged, views = make_case(name)
        torch.save({"state": obj.state_dict(), "batch": staged, "views": views}, tmp / f"{name}.pt")
        inputs[name] = str(tmp / f"{name}.pt")
        out = obj(staged, views)
        out.loss.backward()
        refs[name] = {"losses": {k: float(v.detach()) for k, v in {"loss": out.loss, **out.terms}.items()},
                      "grads": {k: p.grad for k, p in obj.named_parameters() if p.grad is not None}}
    run_ranks(_worker, inputs, str(tmp), world=WORLD)
    return {name: (refs[name], torch.load(tmp / f"{name}.out.pt", weights_only=False)) for name in CASES}


@pytest.mark.slow  # gloo ranks
@pytest.mark.parametrize("name", CASES)
def test_two_ranks_equal_one_process_on_the_global_batch(equivalence, name):
    ref, got = equivalence[name]
    assert_ranks_average_to(ref["losses"], got["losses"])  # DDP's mean over the ranks of each rank's share
    if "uneven" in name:  # rank 0 holds no caption: its share of the image-text terms is 0
        assert all(got["losses"][0][t] == 0 for t in ref["losses"] if t != "loss")
    learned = [k for k in ref["grads"] if "estimator.bias" in k or "log_scale" in k or ".decoder.blocks." in k]
    assert learned and all(float(ref["grads"][k].abs().max()) > 0 for k in learned)
    assert_grads_agree(ref["grads"], got["grads"])
