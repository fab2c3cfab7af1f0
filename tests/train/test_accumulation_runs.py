"""Accumulation beyond one process, and in the trainer: on 2 gloo ranks, a step of
``train.accum_steps=2`` (DDP syncing the gradients at the last micro-batch only; FSDP2 gathering the
objective's own parameters in the pass without gradient) gives the gradient of one process
stepping once on the global batch; and `m3i pretrain train.accum_steps=2` trains as K = 1 does."""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import fields, replace

import pytest
import torch
import torch.distributed as tdist
from torch.nn.modules.batchnorm import _BatchNorm

from m3i.batch import Batch, Drawn
from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.train import loop, strategy
from m3i.train.step import BadSteps, TrainStep, make_optimizer
from conftest import needs_data
from ranks import run_ranks

WORLD, B = 2, 4  # B per rank: 2 micro-batches of 2
CPU = torch.device("cpu")
TINY = ["backbone.name=vit_nano", "backbone.depth=2", "train.precision=fp32", "train.clip_grad=0",
        f"data.batch_size={WORLD * B}"]
SCRATCH = ["terms.0.target_encoder.tower=scratch", "terms.0.target_encoder.width=32", "terms.0.target_encoder.depth=1",
           "terms.0.target_encoder.trainable=true"]
CASES = {  # (recipe, overrides, strategies)
    "clip": ("clip", TINY + SCRATCH, ("ddp", "fsdp")),  # both directions over both ranks' captions, rank 0 holding none
    "simclr": ("simclr", TINY, ("ddp",)),                # NT-Xent over both views of the global batch
    "sim": ("sim", TINY, ("ddp",)),                      # UniGrad's correlation all-reduced
    "supervised": ("supervised", TINY, ("ddp", "fsdp")),  # the class table, labels missing on some rows
}
LABELS = torch.tensor([3, -1, 0, 7, 7, -1, 2, 9])
CAPTIONS = [None, None, None, None, "a red car", None, "a small dog", "blue sky"]


def case(name: str, k: int):
    recipe, overrides, _ = CASES[name]
    return load_recipe(recipe, overrides=overrides + [f"train.accum_steps={k}"])


def objective(recipe) -> Objective:
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=10)
    for m in obj.modules():  # per-micro-batch statistics cannot equal the batch's: held fixed
        if isinstance(m, _BatchNorm):
            m.eval()
    return obj


def cut(tree, rows: slice, n: int):
    """Rank r's share of a staged global batch: every per-sample entry, nested, cut to ``rows``."""
    if isinstance(tree, (Batch, Drawn)):
        return replace(tree, **{f.name: cut(getattr(tree, f.name), rows, n) for f in fields(tree)})
    if isinstance(tree, dict):
        return {k: cut(v, rows, n) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor) and tree.dim() and tree.shape[0] == n:
        return tree[rows]
    if isinstance(tree, list):
        return tree[rows] if len(tree) == n and not isinstance(tree[0], dict) else [cut(v, rows, n) for v in tree]
    return tree


def one_step(obj: Objective, model, staged: dict, train) -> dict:
    opt = make_optimizer(obj.param_groups(train.weight_decay), train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.lr_lambda(train))
    step = TrainStep(obj, model, opt, sched, train, nullcontext(), BadSteps(CPU))
    out = step(staged, 0)
    assert step.bad.read()[0] == 0
    return {k: v.item() for k, v in out.items() if not k.startswith("n_")}


def _worker(rank, inputs, out_dir):
    for name, path in inputs.items():
        saved = torch.load(path, weights_only=False)
        staged = cut(saved["batch"], slice(rank * B, (rank + 1) * B), WORLD * B)
        for how in CASES[name][2]:
            recipe = case(name, 2)
            obj = objective(recipe)
            obj.load_state_dict(saved["state"])
            # the accumulated step is the first call of the sharded objective (FSDP2 picks its root then)
            model = strategy.replicate(obj, CPU) if how == "ddp" else strategy.shard(obj, bf16=False)
            for m in obj.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
            syncs = watch_syncs(model)
            losses = [None] * WORLD
            tdist.all_gather_object(losses, one_step(obj, model, staged, recipe.train))
            grads = {k: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                     for k, p in obj.named_parameters() if p.grad is not None}
            if rank == 0:
                torch.save({"losses": losses, "grads": grads, "syncs": syncs}, f"{out_dir}/{name}.{how}.pt")


def watch_syncs(model) -> list:
    """What the step asks of the gradient sync, micro-batch by micro-batch: DDP's ``no_sync``
    entered ("no_sync"), FSDP2's ``set_requires_gradient_sync(flag)`` (the flag)."""
    seen = []
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        real = model.no_sync

        def no_sync():
            seen.append("no_sync")
            return real()

        model.no_sync = no_sync
    else:
        real = model.set_requires_gradient_sync

        def set_sync(flag, *a, **k):
            seen.append(flag)
            return real(flag, *a, **k)

        model.set_requires_gradient_sync = set_sync
    return seen


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{(case, strategy): (one process, K = 1, on the global batch; 2 ranks, K = 2 each)}."""
    from test_equivalence import make_batch

    tmp = tmp_path_factory.mktemp("accum")
    refs, inputs = {}, {}
    for name in CASES:
        obj = objective(case(name, 1))
        batch = make_batch(WORLD * B, 5) | {"label": LABELS, "caption": CAPTIONS}
        torch.manual_seed(5)
        staged = obj.stage(batch, CPU)  # views, masks and captions drawn once, for the global batch
        torch.save({"state": obj.state_dict(), "batch": staged}, tmp / f"{name}.pt")
        inputs[name] = str(tmp / f"{name}.pt")
        losses = one_step(obj, obj, staged, obj.recipe.train)
        refs[name] = {"losses": losses, "grads": {k: p.grad.clone() for k, p in obj.named_parameters() if p.grad is not None}}
    run_ranks(_worker, inputs, str(tmp), world=WORLD)
    return {(name, how): (refs[name], torch.load(tmp / f"{name}.{how}.pt", weights_only=False))
            for name in CASES for how in CASES[name][2]}


@pytest.mark.slow
@pytest.mark.parametrize("name, how", [(n, h) for n in CASES for h in CASES[n][2]])
def test_micro_batches_on_two_ranks_equal_one_process_on_the_global_batch(ranks, name, how):
    ref, got = ranks[name, how]
    for key, value in ref["losses"].items():  # the mean over ranks of each rank's share
        assert sum(r[key] for r in got["losses"]) / WORLD == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert got["losses"][0]["loss"] != got["losses"][1]["loss"]  # the ranks saw different samples
    # the gradients are reduced across ranks once, at the second (last) micro-batch
    assert got["syncs"] == (["no_sync"] if how == "ddp" else [False, True])
    assert set(got["grads"]) == set(ref["grads"])
    scale = max(float(g.abs().max()) for g in ref["grads"].values())
    for key, grad in ref["grads"].items():
        err = float((got["grads"][key] - grad).abs().max())
        assert torch.allclose(got["grads"][key], grad, rtol=1e-4, atol=1e-6 * scale), \
            f"{key}: max |Δgrad| {err:.2e}, max |grad| {float(grad.abs().max()):.2e}"


# -- end to end ----------------------------------------------------------------------------------------
E2E = ["--steps", "3", "--no-progress", "--device", "cpu", "data.batch_size=8", "data.num_workers=0",
       "train.log_every=1", "train.ckpt_every=3", "train.warmup_steps=1", "train.precision=fp32"]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@needs_data
@pytest.mark.slow
def test_pretrain_in_micro_batches_trains_as_one_pass(tmp_path, capsys):
    from m3i.cli import main

    sup = ["--recipe", "supervised", *E2E, "backbone.name=vit_nano", "backbone.depth=2",
           "data.sources=[{spec: fashion-mnist}]"]
    assert main(["pretrain", "--out", str(tmp_path / "one"), *sup]) == 0
    assert main(["pretrain", "--out", str(tmp_path / "two"), *sup, "train.accum_steps=2"]) == 0
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3] and all(r["bad_steps"] == 0 for r in two)
    # the same batches, views and weights: the first loss is the same; AdamW's first updates are
    # ±lr for gradients float noise decides, so afterwards the agreement is to ~lr
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6)
    for a, b in zip(one[1:], two[1:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2)
    assert [r["n_category"] for r in two] == [r["n_category"] for r in one]
    # every kind of term at once (dense UniGrad, class table, caption, view; the ResNet's mixed input)
    assert main(["pretrain", "--out", str(tmp_path / "m3i"), "--recipe", "m3i", *E2E, "train.accum_steps=4",
                 "terms.2.target_encoder.tower=scratch"]) == 0
    rows = metrics(tmp_path / "m3i")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["bad_steps"] == 0 for r in rows)
    assert all(r[t] == r[t] for r in rows for t in ("dense", "category", "caption", "view"))
    # a batch that does not split is refused before any work, naming the field
    assert main(["pretrain", "--out", str(tmp_path / "bad"), *sup, "train.accum_steps=3"]) == 2
    assert "train.accum_steps: 3 micro-batches do not divide data.batch_size 8" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
