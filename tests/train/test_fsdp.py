"""FSDP2 on CPU (2 gloo processes): a sharded step gives the loss and gradients of one process
on the global batch for every estimator, and `m3i pretrain train.strategy=fsdp` trains like DDP,
checkpoints a sharded optimizer state and resumes from it on 2 ranks and on 1."""
import copy
import json

import pytest
import torch
import torch.distributed as tdist

from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.train import strategy
from conftest import needs_data
from ranks import run_ranks
from test_distributed import B, WORLD, global_case, rank_slice, single_process_references

TINY = ["backbone.name=vit_nano", "backbone.depth=2", "train.precision=fp32"]
CASES = {  # every estimator: boltzmann (batch, both directions; all pairs; classes), gaussian, unigrad
    "clip": ("clip", TINY + ["terms.0.target_encoder.tower=scratch"]),
    "simclr": ("simclr", TINY),
    "supervised": ("supervised", TINY),
    "byol": ("byol", TINY),          # gaussian, EMA teacher with a head, batch norm
    "sim": ("sim", TINY),            # unigrad, dense, masked input
    # every kind at once; the mixed input pairs images within each rank's batch, so here one
    # image per canvas: dropped tokens (ViT), mask tokens (ConvNeXt, sharded by stage)
    "m3i": ("m3i", TINY + ["terms.2.target_encoder.tower=scratch", "views.input_mode=drop"]),
    "convnext": ("m3i", ["backbone.name=convnext_atto", "backbone.patch_size=8", "train.precision=fp32",
                         "terms.2.target_encoder.tower=scratch", "views.input_mode=fill"]),
}


def make_case(name):
    recipe = load_recipe(CASES[name][0], overrides=CASES[name][1])
    labels = torch.tensor([3, -1, 0, 7, 7, -1, 2, 9])
    captions = [None if i in (1, 6) else f"a small picture number {i}" for i in range(WORLD * B)]
    obj, batch, views = global_case(recipe, labels, captions, num_classes=10)
    return recipe, obj, batch, views


def _worker(rank, inputs, out_dir):
    for name, path in inputs.items():
        case = torch.load(path, weights_only=False)
        recipe = load_recipe(CASES[name][0], overrides=CASES[name][1])
        obj = Objective(recipe, num_classes=10)
        obj.load_state_dict(case["state"])
        strategy.shard(obj, bf16=False)
        assert strategy.is_sharded(obj)
        batch, views = rank_slice(case["batch"], case["views"], rank)
        out = obj(batch, views)
        out["loss"].backward()
        losses = [None] * WORLD
        tdist.all_gather_object(losses, {k: v.item() for k, v in out.items() if not k.startswith("n_")})
        strategy.sync_replicated_grads(obj)  # the temperatures FSDP leaves whole, as the trainer does
        grads = {k: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                 for k, p in obj.named_parameters() if p.grad is not None}
        if rank == 0:
            torch.save({"losses": losses, "grads": grads}, f"{out_dir}/{name}.out.pt")


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    refs, inputs = single_process_references(make_case, CASES, tmp)
    run_ranks(_worker, inputs, str(tmp), world=WORLD)
    return {name: (refs[name], torch.load(tmp / f"{name}.out.pt", weights_only=False)) for name in CASES}


@pytest.mark.slow  # gloo ranks
@pytest.mark.parametrize("name", CASES)
def test_fsdp_step_equals_one_process_on_the_global_batch(equivalence, name):
    ref, got = equivalence[name]
    for key, value in ref["losses"].items():  # the mean over ranks of each rank's loss
        assert sum(r[key] for r in got["losses"]) / WORLD == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert set(got["grads"]) == set(ref["grads"])  # the same parameters learn (teacher and frozen ones not)
    scale = max(float(g.norm()) for g in ref["grads"].values())
    for key, grad in ref["grads"].items():  # the gathered shards of the reduce-scattered gradients
        err = float((got["grads"][key] - grad).norm())
        assert err <= 1e-4 * float(grad.norm()) + 1e-6 * scale, f"{key}: |error| {err:.2e}, |grad| {grad.norm():.2e}"


def test_sharding_leaves_whole_only_what_runs_on_the_host():
    """A frozen MiniLM with its caption cache runs while the host stages a batch, outside the
    forward pass where FSDP gathers shards: FSDP must leave it whole. A trained tower runs inside."""
    from m3i.encoders.text import MiniLMTower

    frozen, uncached = MiniLMTower(), MiniLMTower(cache=False)  # uncached, as trained: run in the forward pass
    towers = torch.nn.ModuleDict({"frozen": frozen, "uncached": uncached})
    assert strategy.host_parameters(towers) == set(frozen.model.parameters())
    assert len(strategy.host_parameters(towers)) > 50


def test_batch_norm_gathered_in_bf16_computes_in_float32_beside_its_float32_statistics():
    """FSDP's bf16 blocks gather a batch norm's weight and bias in bfloat16 while its running
    statistics stay float32: in eval (the monitors) and in training on one rank, it normalises as
    a float32 batch norm of the same numbers does, and keeps its statistics float32."""
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        for t, lo, hi in ((ref.weight, 0.5, 1.5), (ref.bias, -1, 1), (ref.running_mean, -1, 1), (ref.running_var, 0.5, 2)):
            t.uniform_(lo, hi)
    bn = strategy.global_batch_norm(torch.nn.Sequential(copy.deepcopy(ref)))[0]
    bn.weight, bn.bias = (torch.nn.Parameter(p.detach().bfloat16()) for p in (ref.weight, ref.bias))
    with torch.no_grad():  # the reference computes on the same (bf16-rounded) numbers, in float32
        ref.weight.copy_(bn.weight.float())
        ref.bias.copy_(bn.bias.float())
    x = torch.randn(6, 4, 5, 5).bfloat16()
    for training in (False, True):
        bn.train(training)
        ref.train(training)
        y, expected = bn(x), ref(x.float())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
        for key in ("running_mean", "running_var"):
            assert getattr(bn, key).dtype == torch.float32
            torch.testing.assert_close(getattr(bn, key), getattr(ref, key))
    assert int(bn.num_batches_tracked) == 1


# -- end to end ----------------------------------------------------------------------------------------
E2E = ["--recipe", "m3i", "--no-progress", "--device", "cpu", "backbone.name=vit_nano", "backbone.depth=2",
       "data.batch_size=8", "data.num_workers=0", "terms.2.target_encoder.tower=scratch", "train.log_every=1",
       "train.ckpt_every=2", "train.precision=fp32", "train.warmup_steps=1"]


def _pretrain_worker(rank, root):
    from m3i.cli import main

    assert main(["pretrain", "--out", f"{root}/fsdp", "--steps", "3", *E2E, "train.strategy=fsdp"]) == 0
    assert main(["pretrain", "--out", f"{root}/fsdp2", "--steps", "3", "--resume",
                 f"{root}/fsdp/checkpoints/step_000002", *E2E, "train.strategy=fsdp"]) == 0
    assert main(["pretrain", "--out", f"{root}/ddp", "--steps", "2", *E2E, "train.strategy=ddp"]) == 0
    # bf16: the blocks gather and compute in bfloat16 (the rest under autocast, batch norm in float32)
    assert main(["pretrain", "--out", f"{root}/fsdp_bf16", "--steps", "2", *E2E, "train.strategy=fsdp",
                 "train.precision=bf16"]) == 0
    for how in ("fsdp", "ddp"):  # train.compile under either strategy
        assert main(["pretrain", "--out", f"{root}/{how}_compiled", "--steps", "2", *E2E, f"train.strategy={how}",
                     "train.compile=true"]) == 0


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@needs_data
@pytest.mark.slow
def test_fsdp_run_trains_like_ddp_and_resumes_on_two_ranks_and_on_one(tmp_path):
    from m3i.cli import main
    from m3i.runs import checkpoint as ckpt
    from m3i.train.step import make_optimizer

    run_ranks(_pretrain_worker, str(tmp_path), world=WORLD, rendezvous="env")
    fsdp, ddp = metrics(tmp_path / "fsdp"), metrics(tmp_path / "ddp")
    assert [r["step"] for r in fsdp] == [1, 2, 3]
    # the same initial weights and global batches: FSDP and DDP agree. AdamW's first updates are
    # ±lr for gradients that float noise alone decides (0 in exact arithmetic, e.g. biases before
    # batch norm), so after one update the agreement is to ~lr, not to float precision
    for key in ("loss", "dense", "category", "caption", "view"):
        assert fsdp[0][key] == pytest.approx(ddp[0][key], rel=1e-5, abs=1e-6), key
        assert fsdp[1][key] == pytest.approx(ddp[1][key], rel=3e-3), key
    for how, eager in (("fsdp", fsdp), ("ddp", ddp)):  # compiled blocks compute what eager ones do
        compiled = metrics(tmp_path / f"{how}_compiled")
        for key in ("loss", "dense", "category", "caption", "view"):
            assert compiled[0][key] == pytest.approx(eager[0][key], rel=1e-4, abs=1e-5), (how, key)
            assert compiled[1][key] == pytest.approx(eager[1][key], rel=3e-3), (how, key)
    bf16 = metrics(tmp_path / "fsdp_bf16")
    for key in ("loss", "dense", "category", "caption", "view"):
        assert bf16[0][key] == pytest.approx(fsdp[0][key], rel=3e-2), key
    assert all(r["bad_steps"] == 0 for r in bf16)
    step2 = tmp_path / "fsdp" / "checkpoints" / "step_000002"
    assert (step2 / "optimizer" / ".metadata").is_file()  # torch.distributed.checkpoint, one file per rank
    assert len(list((step2 / "optimizer").glob("*.distcp"))) == WORLD
    wf, sf = ckpt.load(step2)
    wd, sd = ckpt.load(tmp_path / "ddp" / "checkpoints" / "step_000002")
    assert sf["optimizer"] == "optimizer" and set(wf) == set(wd)
    lr_sum = 1.5e-3  # the two steps' learning rates (warm-up half, then the peak 1e-3)
    for k in wd:  # the gathered weights (teacher included) are DDP's, to the sum of the steps
        torch.testing.assert_close(wf[k], wd[k], rtol=1e-4, atol=2 * lr_sum, msg=lambda m, k=k: f"{k}: {m}")

    # resumed on 2 ranks from step 2: step 3 repeats
    resumed = metrics(tmp_path / "fsdp2")
    assert [r["step"] for r in resumed] == [3]
    for key in ("loss", "dense", "category", "caption", "view"):
        assert resumed[0][key] == pytest.approx(fsdp[2][key], rel=1e-5, abs=1e-6), key

    # on 1 process: the 2 shards of AdamW's state load into one whole optimizer, equal to DDP's
    recipe = load_recipe(str(tmp_path / "fsdp" / "config.yaml"))
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=wf["terms.1.classes.weight"].shape[0])
    obj.load_checkpoint_state(wf, "fsdp step 2")
    opt = make_optimizer(obj.param_groups(recipe.train.weight_decay), recipe.train)
    strategy.load_sharded_optimizer(obj, opt, step2 / "optimizer")
    ref = torch.optim.AdamW(obj.param_groups(recipe.train.weight_decay), fused=True)
    ref.load_state_dict(sd["optimizer"])
    assert len(opt.state) == len(ref.state) > 0
    for p in opt.state:
        torch.testing.assert_close(opt.state[p]["step"], ref.state[p]["step"])
        for key in ("exp_avg", "exp_avg_sq"):  # moments of gradients that agree to float noise
            scale = float(ref.state[p][key].abs().max())
            torch.testing.assert_close(opt.state[p][key], ref.state[p][key], rtol=2e-2, atol=2e-2 * scale + 1e-9)
    assert float(next(iter(opt.state.values()))["step"]) == 2.0

    # and `m3i pretrain --resume` of the FSDP run on 1 process continues it
    assert main(["pretrain", "--out", str(tmp_path / "one"), "--steps", "3", "--resume", str(step2), *E2E,
                 "train.strategy=fsdp"]) == 0
    assert [r["step"] for r in metrics(tmp_path / "one")] == [3]
