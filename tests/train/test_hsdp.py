"""Hybrid sharding (``train.strategy=hsdp``) on 4 gloo processes as 2 "nodes" × 2: the mesh from
the launch or ``train.mesh``; two of the trainer's steps equal one process's on the global batch
(loss and weights, the EMA teacher's included); a checkpoint written on 2 × 2 resumes on 1 × 4
and on one process."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.distributed as tdist

from m3i.config import ConfigError, load_recipe
from m3i.objective import Objective
from m3i.train import strategy
from m3i.train.setup import ready_run
from conftest import needs_data
from ranks import run_ranks

WORLD, B = 4, 2  # 4 ranks of 2 images: a global batch of 8
TINY = ["backbone.name=vit_nano", "backbone.depth=2", "train.precision=fp32", "train.warmup_steps=1",
        f"data.batch_size={WORLD * B}", "train.strategy=hsdp", "train.mesh=[2, 2]"]
CASES = {  # CLIP: captions gathered over the whole world, a learned temperature left whole;
    # data2vec: the EMA teacher, sharded like the online network, updated on each rank's shards
    "clip": ("clip", TINY + ["terms.0.target_encoder.tower=scratch"]),
    "data2vec": ("data2vec", TINY + ["backbone.depth=3"]),  # its top 3 blocks
}


def test_the_mesh_comes_from_the_launch_or_the_setting():
    train = load_recipe("clip", overrides=["train.strategy=hsdp"]).train
    assert strategy.mesh_shape(train, 16, local=8) == (2, 8)   # 2 nodes of 8: shard in a node, replicate across
    assert strategy.mesh_shape(train, 8, local=8) == (1, 8)    # one node: FSDP over it
    assert strategy.mesh_shape(train, 4) == (1, 4)             # no LOCAL_WORLD_SIZE: every rank one node
    with pytest.raises(ValueError, match=r"train.strategy=hsdp: 12 ranks are no whole number of nodes of 8"):
        strategy.mesh_shape(train, 12, local=8)
    given = load_recipe("clip", overrides=["train.strategy=hsdp", "train.mesh=[4, 2]"]).train
    assert strategy.mesh_shape(given, 8, local=8) == (4, 2)    # the setting wins over the launch
    with pytest.raises(ValueError, match=r"train.mesh: \[4, 2\] is 4 × 2 = 8 ranks; the launch has 16"):
        strategy.mesh_shape(given, 16)
    with pytest.raises(ConfigError, match=r"train.mesh: \[2, 2\] is the device mesh of train.strategy=hsdp; "
                                          r"the strategy is fsdp"):
        load_recipe("clip", overrides=["train.strategy=fsdp", "train.mesh=[2, 2]"])
    with pytest.raises(ConfigError, match=r"train.mesh: \[0, 2\]: expected \[replicas, shards\]"):
        load_recipe("clip", overrides=["train.strategy=hsdp", "train.mesh=[0, 2]"])


# -- the trainer's step on 2 × 2 ranks against one process ------------------------------------------
def cut(tree, rows: slice, n: int):
    """Rank ``rows`` of everything per sample in a staged batch (images, labels, captions, the
    views' drawn parameters, masks, the targets' host inputs)."""
    if isinstance(tree, torch.Tensor):
        return tree[rows] if tree.dim() and tree.shape[0] == n else tree
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{f.name: cut(getattr(tree, f.name), rows, n)
                                            for f in dataclasses.fields(tree) if f.init})
    if isinstance(tree, dict):
        return {k: cut(v, rows, n) for k, v in tree.items()}
    if isinstance(tree, list) and len(tree) == n and not any(isinstance(v, (torch.Tensor, dict, list)) for v in tree):
        return tree[rows]
    if isinstance(tree, (list, tuple)):
        return type(tree)(cut(v, rows, n) for v in tree)
    return tree


def global_batches(recipe, obj, steps: int = 2):
    """``steps`` staged global batches of WORLD·B images (views and masks drawn once, on the host)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        batch = {"image": torch.randint(0, 256, (WORLD * B, 3, 32, 32), dtype=torch.uint8, generator=g),
                 "caption": [f"a small picture number {i}" for i in range(WORLD * B)]}
        out.append(obj.stage(batch, torch.device("cpu")))
    return out


def two_steps(recipe, obj, batches) -> tuple[list[float], list[dict]]:
    """The trainer's step (clipping, fused AdamW, the EMA update) on each batch -> each step's
    loss and gradients (gathered whole where sharded)."""
    run = ready_run(recipe, obj, torch.device("cpu"))
    losses, grads = [], []
    for i, b in enumerate(batches):
        losses.append(float(run.step(b, i).loss.detach()))
        grads.append({k: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                      for k, p in obj.named_parameters() if p.grad is not None})
    return losses, grads


def _steps_worker(rank, inputs, out_dir):
    for name, path in inputs.items():
        case = torch.load(path, weights_only=False)
        recipe = load_recipe(CASES[name][0], overrides=CASES[name][1])
        obj = Objective(recipe)
        obj.load_state_dict(case["state"])
        rows = slice(rank * B, (rank + 1) * B)
        losses, grads = two_steps(recipe, obj, [cut(b, rows, WORLD * B) for b in case["batches"]])
        mesh = obj.backbone.blocks[0].attn.qkv.weight.device_mesh
        assert mesh.mesh_dim_names == ("replicate", "shard") and tuple(mesh.shape) == (2, 2)
        gathered = [None] * WORLD
        tdist.all_gather_object(gathered, losses)
        weights = strategy.full_state_dict(obj)
        if rank == 0:
            torch.save({"losses": gathered, "grads": grads, "weights": weights}, f"{out_dir}/{name}.out.pt")


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hsdp")
    refs, inputs = {}, {}
    for name, (base, overrides) in CASES.items():
        recipe = load_recipe(base, overrides=overrides)
        torch.manual_seed(0)
        obj = Objective(recipe)
        batches = global_batches(recipe, obj)
        torch.save({"state": obj.state_dict(), "batches": batches}, tmp / f"{name}.pt")
        inputs[name] = str(tmp / f"{name}.pt")
        start = {k: v.clone() for k, v in obj.state_dict().items()}
        losses, grads = two_steps(recipe, obj, batches)
        refs[name] = {"losses": losses, "grads": grads, "weights": obj.state_dict(), "start": start}
    run_ranks(_steps_worker, inputs, str(tmp), world=WORLD)
    return {name: (refs[name], torch.load(tmp / f"{name}.out.pt", weights_only=False)) for name in CASES}


@pytest.mark.slow  # 4 gloo ranks
@pytest.mark.parametrize("name", CASES)
def test_two_hsdp_steps_equal_one_process_on_the_global_batch(equivalence, name):
    ref, got = equivalence[name]
    for step in range(2):  # each rank scores its own rows against the global batch: their mean is the whole loss
        mean = sum(r[step] for r in got["losses"]) / WORLD
        assert mean == pytest.approx(ref["losses"][step], rel=1e-6, abs=1e-7), step
    # the gradient of the global batch (reduce-scattered in a node, all-reduced across) to float
    # noise; at step 2 through step 1's weights too
    scale = max(float(g.norm()) for g in ref["grads"][0].values())
    for step, tol in ((0, 1e-5), (1, 1e-4)):
        assert set(got["grads"][step]) == set(ref["grads"][step])
        for key, g in ref["grads"][step].items():
            err = float((got["grads"][step][key] - g).norm())
            assert err <= tol * float(g.norm()) + 1e-2 * tol * scale, f"step {step + 1} {key}: |error| {err:.2e}"
    # the weights after two AdamW steps and two EMA updates of the teacher: every entry whose
    # gradient the two agree on (to 1e-3 of it, at both steps) within 1e-6 of one process's. AdamW
    # divides each gradient by its own magnitude, so an entry whose gradient is 0 but for float
    # noise (a key projection's bias: softmax over the keys is blind to a shift they share) moves
    # by up to ±lr on the noise alone, whatever the strategy: those stay within the steps' lr
    assert set(got["weights"]) == set(ref["weights"])
    undecided = total = 0
    for key, w in ref["weights"].items():
        param = key.removeprefix("teacher.")  # the teacher follows the online weights
        decided = torch.ones_like(w, dtype=torch.bool)
        for step in range(2):
            if (g := ref["grads"][step].get(param)) is not None:
                decided &= (got["grads"][step][param] - g).abs() <= 1e-3 * g.abs()
        diff = (got["weights"][key] - w).abs()
        assert float(torch.where(decided, diff, 0.0).max()) <= 1e-6, key
        assert float(diff.max()) <= 1.5e-3, key  # the two steps' learning rates: 5e-4 (warm-up), then 1e-3
        undecided, total = undecided + int((~decided).sum()), total + w.numel()
    assert undecided < 0.02 * total
    if name == "data2vec":  # the teacher moved (on each rank's shards), as one process's did
        key = "teacher.backbone.blocks.0.mlp.fc1.weight"
        assert float((got["weights"][key] - ref["start"][key]).abs().max()) > 1e-6


# -- a run's checkpoint on another mesh ---------------------------------------------------------------
# views that depend on no random draw: one process draws what 4 ranks draw, so the runs can agree
E2E = ["--recipe", "clip", "--no-progress", "--device", "cpu", "backbone.name=vit_nano", "backbone.depth=2",
       "data.batch_size=8", "data.num_workers=0", "terms.0.target_encoder.tower=scratch", "train.log_every=1",
       "train.ckpt_every=2", "train.precision=fp32", "train.warmup_steps=1", "train.strategy=hsdp",
       "views.augment=[{crop_scale: [1.0, 1.0], crop_ratio: [1.0, 1.0], flip_p: 0.0, jitter_p: 0.0, gray_p: 0.0}]"]


def _run_worker(rank, root):
    from m3i.cli import main

    assert main(["pretrain", "--out", f"{root}/2x2", "--steps", "3", *E2E, "train.mesh=[2, 2]"]) == 0
    assert main(["pretrain", "--out", f"{root}/1x4", "--steps", "3", "--resume", f"{root}/2x2/checkpoints/step_000002",
                 *E2E, "train.mesh=[1, 4]"]) == 0


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@needs_data
@pytest.mark.slow  # 4 gloo ranks
def test_a_checkpoint_written_on_2x2_resumes_on_1x4_and_on_one_process(tmp_path):
    from m3i.cli import main
    from m3i.runs import checkpoint as ckpt

    run_ranks(_run_worker, str(tmp_path), world=WORLD, rendezvous="env")
    step2 = tmp_path / "2x2" / "checkpoints" / "step_000002"
    assert len(list((step2 / "optimizer").glob("*.distcp"))) == WORLD  # every rank wrote its shards
    assert main(["pretrain", "--out", str(tmp_path / "one"), "--steps", "3", "--resume", str(step2), *E2E]) == 0
    assert [r["step"] for r in metrics(tmp_path / "1x4")] == [3] == [r["step"] for r in metrics(tmp_path / "one")]
    # the same 4 ranks on another mesh log rank 0's loss of step 3 as the 2 × 2 run did
    assert metrics(tmp_path / "1x4")[0]["loss"] == pytest.approx(metrics(tmp_path / "2x2")[2]["loss"], rel=1e-6)
    final = ckpt.load_weights(tmp_path / "2x2")
    assert ckpt.step_of(ckpt.find(tmp_path / "2x2")) == 3
    # step 3 on 1 × 4, and on one process: the weights of the 2 × 2 run's step 3. The keys' bias
    # gets no gradient but float noise (above): within the step's lr. One process sums each
    # gradient in another order than 4 ranks, which AdamW amplifies in the few entries whose
    # gradient is near 0: within 1e-5 there, 1e-6 everywhere else
    for other, off in (("1x4", 0), ("one", 1e-3)):
        weights = ckpt.load_weights(tmp_path / other)
        assert set(weights) == set(final)
        over = total = 0
        for key, w in final.items():
            diff = (weights[key] - w).abs()
            if key.endswith("attn.qkv.bias"):
                d = w.shape[0] // 3
                assert float(diff[d:2 * d].max()) <= 1e-3, (other, key)
                diff = torch.cat([diff[:d], diff[2 * d:]])
            assert float(diff.max()) <= (1e-5 if off else 1e-6), (other, key, float(diff.max()))
            over, total = over + int((diff > 1e-6).sum()), total + diff.numel()
        assert over <= off * total, (other, over)
