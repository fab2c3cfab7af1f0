"""Scale-out on CPU: 2 gloo processes of batch B give the loss and gradients of one process on
the global batch of 2·B, and `m3i pretrain` runs, checkpoints and resumes on 2 ranks as under torchrun."""
import json

import pytest
import torch
import torch.distributed as tdist

from m3i import distributed as dist
from m3i.train import strategy
from m3i.config import load_recipe
from m3i.objective import Objective, Views
from conftest import needs_data
from ranks import assert_grads_agree, assert_ranks_average_to, run_ranks

WORLD, B = 2, 4
TINY = ["backbone.name=vit_nano", "backbone.depth=2"]
CLIP = TINY + ["terms.0.target_encoder.tower=scratch"]
CASES = {  # case: (recipe, overrides, rows of the global batch without caption)
    "clip": ("clip", CLIP, (1, B + 2)),             # gathered captions, availability masks: 3 per rank
    "clip_uneven": ("clip", CLIP, (0, 1, 2, 3, 5)),  # rank 0 holds no caption, rank 1 three
    "simclr": ("simclr", TINY, ()),  # NT-Xent over both views of the global batch, global batch norm
    "sim": ("sim", TINY, ()),        # UniGrad: the target correlation all-reduced
}

# -- the global batch, fixed in the parent ----------------------------------------------------
def case_recipe(name: str):
    recipe, overrides, _ = CASES[name]
    return load_recipe(recipe, overrides=overrides)


def global_case(recipe, labels: torch.Tensor, captions: list, num_classes: int = 0):
    """The objective (seed 0), a global batch of WORLD·B images with ``labels`` and ``captions``,
    its views, and the masks drawn once on the global batch."""
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=num_classes)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randint(0, 256, (WORLD * B, 3, 32, 32), dtype=torch.uint8, generator=g),
             "label": labels, "caption": captions}
    views = obj.make_views(batch["image"])
    masked = {t.source.view for t in recipe.terms if t.source.masked}
    if masked:
        ctx = obj.context(batch, views)
        views.visible = {v: ctx.visible(v) for v in masked}
    return obj, batch, views


def make_case(name: str):
    recipe = case_recipe(name)
    n = WORLD * B
    captions = [None if i in CASES[name][2] else f"a small picture number {i}" for i in range(n)]
    obj, batch, views = global_case(recipe, torch.full((n,), -1), captions)
    return recipe, obj, batch, views


def rank_slice(batch: dict, views: Views, r: int):
    rows = slice(r * B, (r + 1) * B)
    part = {k: v[rows] for k, v in batch.items()}
    return part, Views([x[rows] for x in views.images], [x[rows] for x in views.boxes],
                       [x[rows] for x in views.flips], {k: v[rows] for k, v in views.visible.items()})


def _equivalence_worker(rank, inputs, out_dir):
    _gather_worker(rank, out_dir)
    for name, path in inputs.items():
        case = torch.load(path, weights_only=False)
        obj = Objective(case_recipe(name))
        obj.load_state_dict(case["state"])
        model = strategy.replicate(obj, torch.device("cpu"))
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        batch, views = rank_slice(case["batch"], case["views"], rank)
        out = model(batch, views)
        out["loss"].backward()
        losses = [None] * WORLD
        tdist.all_gather_object(losses, {k: v.item() for k, v in out.items() if not k.startswith("n_")})
        if rank == 0:  # DDP has averaged the gradients over the ranks
            torch.save({"losses": losses,
                        "grads": {k: p.grad for k, p in obj.named_parameters() if p.grad is not None},
                        "buffers": dict(obj.named_buffers())}, f"{out_dir}/{name}.out.pt")


def single_process_references(make_case, names, tmp) -> tuple[dict, dict]:
    """For each case: its objective, batch and views saved for the ranks to load, and one process's
    losses, gradients and buffers on the whole global batch -> (references, saved input paths)."""
    refs, inputs = {}, {}
    for name in names:
        recipe, obj, batch, views = make_case(name)
        torch.save({"state": obj.state_dict(), "batch": batch, "views": views}, tmp / f"{name}.pt")
        inputs[name] = str(tmp / f"{name}.pt")
        out = obj(batch, views)
        out["loss"].backward()
        refs[name] = {"losses": {k: v.item() for k, v in out.items() if not k.startswith("n_")},
                      "grads": {k: p.grad for k, p in obj.named_parameters() if p.grad is not None},
                      "buffers": dict(obj.named_buffers())}
    return refs, inputs


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """{case: (single-process reference, 2-rank result)}, from one spawn for every case."""
    tmp = tmp_path_factory.mktemp("dist")
    refs, inputs = single_process_references(make_case, CASES, tmp)
    run_ranks(_equivalence_worker, inputs, str(tmp), world=WORLD)
    out = {name: (refs[name], torch.load(tmp / f"{name}.out.pt", weights_only=False)) for name in CASES}
    out["gather"] = [torch.load(tmp / f"gather{r}.pt") for r in range(WORLD)]
    out["compiled"] = [torch.load(tmp / f"compiled{r}.pt") for r in range(WORLD)]
    return out


@pytest.mark.slow  # gloo ranks
@pytest.mark.parametrize("name", CASES)
def test_two_ranks_equal_one_process_on_the_global_batch(equivalence, name):
    ref, got = equivalence[name]
    assert_ranks_average_to(ref["losses"], got["losses"])  # DDP's mean over the ranks of each rank's share
    assert got["losses"][0]["loss"] != got["losses"][1]["loss"]  # the ranks saw different samples
    assert_grads_agree(ref["grads"], got["grads"])
    for key, buf in ref["buffers"].items():  # batch-norm running statistics of the global batch
        if buf.is_floating_point():
            torch.testing.assert_close(got["buffers"][key], buf, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow  # gloo ranks
def test_gather_puts_each_rank_at_its_offset_and_sends_gradients_home(equivalence):
    for r in range(WORLD):
        assert equivalence["gather"][r] == pytest.approx([float(20 * r + 1)] * 3)


@pytest.mark.slow  # gloo ranks
def test_a_compiled_loss_over_a_gathered_mask_equals_eager(equivalence):
    for compiled, eager in equivalence["compiled"]:
        assert compiled == pytest.approx(eager, rel=1e-5)


def _gather_worker(rank, out_dir):
    x = torch.full((3, 2), float(rank), requires_grad=True)
    y = dist.gather_with_grad(x)
    assert torch.equal(y[:, 0], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    # rank r's loss weighs rank q's rows by 10·q + r: the gradient at rank q's rows adds both ranks'
    w = torch.arange(WORLD).repeat_interleave(3).float() * 10 + rank
    (y[:, 0] * w).sum().backward()
    torch.save(x.grad[:, 0].tolist(), f"{out_dir}/gather{rank}.pt")
    assert bool(dist.all_ranks(torch.tensor(True))) and not bool(dist.all_ranks(torch.tensor(rank == 0)))
    mask = dist.gather(torch.tensor([True, rank == 0]))
    assert mask.dtype == torch.bool and mask.tolist() == [True, True, True, False]
    # a gathered bool mask inside a compiled loss (CLIP's Boltzmann over the global batch, one caption
    # missing): inductor's CPU code takes it (it failed on a gathered bool), with the eager value
    from m3i.estimators.boltzmann import batch_boltzmann

    torch.manual_seed(rank)
    args = (torch.randn(4, 8), torch.randn(4, 8), torch.tensor([True, rank == 0, True, True]), torch.tensor(0.07),
            "batch", 2)
    torch.save([float(torch.compile(batch_boltzmann)(*args)), float(batch_boltzmann(*args))],
               f"{out_dir}/compiled{rank}.pt")


# -- end to end: `m3i pretrain` on 2 ranks, rank 0 writes, resume ------------------------------
E2E = ["--recipe", "m3i", "--steps", "3", "--no-progress", "--device", "cpu", "backbone.name=vit_nano",
       "backbone.depth=2", "data.batch_size=8", "data.num_workers=0", "terms.2.target_encoder.tower=scratch",
       "train.log_every=1", "train.ckpt_every=2", "train.warmup_steps=1"]


def _pretrain_worker(rank, a, b):
    # under what torchrun sets (run_ranks' "env" rendezvous) the trainer's setup_device starts the gloo
    # group once, a second run in the process uses it again, and the interpreter's exit destroys it
    # (left to the interpreter's own teardown, gloo can abort the process)
    import atexit

    from m3i.cli import main

    assert not tdist.is_initialized()
    assert main(["pretrain", "--out", a, *E2E]) == 0
    assert tdist.is_initialized() and tdist.get_backend() == "gloo"
    assert main(["pretrain", "--out", b, "--resume", f"{a}/checkpoints/step_000002", *E2E]) == 0
    atexit._run_exitfuncs()  # what the interpreter runs first when it exits
    assert not tdist.is_initialized()


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@needs_data
@pytest.mark.slow
def test_pretrain_on_two_ranks_writes_on_rank_0_and_resumes_exactly(tmp_path, capfd):
    from m3i.runs import checkpoint as ckpt

    a, b = tmp_path / "a", tmp_path / "b"
    run_ranks(_pretrain_worker, str(a), str(b), world=WORLD, rendezvous="env")
    out = capfd.readouterr().out
    assert out.count("checkpoint:") == 2  # rank 0 reports, once per run

    rows = metrics(a)
    assert [r["step"] for r in rows] == [1, 2, 3], out[-2000:]
    assert all(r["bad_steps"] == 0 and r["loss"] == r["loss"] for r in rows)
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000003"]
    _, state = ckpt.load(a)
    assert state["step"] == 3 and len(state["rng"]) == WORLD  # one random state per rank
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    # resumed from the step-2 checkpoint (per-rank random state, data stream, teacher), step 3 repeats
    resumed = metrics(b)
    assert [r["step"] for r in resumed] == [3]
    for key in ("loss", "dense", "category", "caption"):
        assert resumed[0][key] == pytest.approx(rows[2][key], rel=1e-6, abs=1e-7), key
    wa, _ = ckpt.load(a)
    wb, _ = ckpt.load(b)
    assert set(wa) == set(wb)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-6, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}")
