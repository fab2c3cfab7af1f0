"""The training step: a non-finite step is skipped on the device exactly as if it had not been
taken (parameters, AdamW moments and step count, EMA teacher, batch-norm statistics), the step
reads nothing back to the host beyond what the objective's own forward does, and
``train.compile`` trains like eager."""
import json
from contextlib import nullcontext

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.train import loop
from m3i.device import autocast_for
from m3i.train.step import BadSteps, TrainStep, make_optimizer, make_scaler
from conftest import needs_data

TINY = ["backbone.name=vit_nano", "backbone.depth=2", "data.batch_size=8", "data.num_workers=0"]


def batch(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            "label": torch.randint(0, 10, (n,), generator=g), "caption": [None] * n}


def setup(recipe):
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=10)
    opt = make_optimizer(obj.param_groups(recipe.train.weight_decay), recipe.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.lr_lambda(recipe.train))
    bad = BadSteps(torch.device("cpu"))
    return obj, opt, sched, bad, TrainStep(obj, obj, opt, sched, recipe.train, nullcontext(), bad)


def poisoned_forward(obj):
    real = obj.forward

    def forward(b, views=None):
        out = real(b, views)
        out["loss"] = out["loss"] * float("nan")
        return out

    return forward


def test_skipped_step_changes_nothing_but_the_schedule():
    # byol: EMA teacher with a head, batch norm in the projector and predictor
    recipe = load_recipe("byol", overrides=TINY + ["train.steps=10", "train.warmup_steps=0"])
    a_obj, a_opt, a_sched, a_bad, a_step = setup(recipe)
    b_obj, b_opt, b_sched, b_bad, b_step = setup(recipe)
    assert any("running_mean" in n for n, _ in a_obj.named_buffers())

    torch.manual_seed(1)
    a_step(batch(0), 0)
    torch.manual_seed(2)
    a_obj.forward = poisoned_forward(a_obj)
    a_step(batch(1), 1)  # not finite: skipped on the device
    del a_obj.forward
    torch.manual_seed(3)
    a_step(batch(2), 2)

    torch.manual_seed(1)
    b_step(batch(0), 0)
    b_sched.step()  # step 1 not taken at all; the schedule still moves on
    torch.manual_seed(3)
    b_step(batch(2), 2)

    assert a_bad.read() == (1, 0, 1) and b_bad.read() == (0, 0, 0)
    sa, sb = a_obj.state_dict(), b_obj.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    oa, ob = a_opt.state_dict()["state"], b_opt.state_dict()["state"]
    for i in oa:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(oa[i][key], ob[i][key], rtol=0, atol=0)
    assert float(oa[0]["step"]) == 2.0
    assert a_sched.last_epoch == b_sched.last_epoch == 3


def test_bad_steps_count_the_longest_row_between_reads():
    bad = BadSteps(torch.device("cpu"))
    for flag in [1, 1, 0, 1, 1, 1, 0]:
        bad.add(torch.tensor(bool(flag)))
    assert bad.read() == (5, 0, 3)
    bad.add(torch.tensor(True))
    assert bad.read() == (6, 1, 1)  # the longest row restarts from the current one at each read


class ScalarReads(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (.item(), float(), int(), bool())."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["sim", "byol", "m3i"])
def test_step_reads_no_value_back_beyond_the_objective(name):
    ov = ["terms.2.target_encoder.tower=scratch"] if name == "m3i" else []
    recipe = load_recipe(name, overrides=TINY + ov)
    obj, opt, sched, bad, step = setup(recipe)
    b = batch(0)
    step(b, 0)  # optimiser state created
    with ScalarReads() as fwd:
        torch.manual_seed(5)
        obj(b)
    with ScalarReads() as whole:
        torch.manual_seed(5)
        step(b, 1)
    assert whole.n == fwd.n


@needs_data
@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path):
    ov = TINY + ["train.steps=3", "train.log_every=1", "train.warmup_steps=1", "data.sources=[{spec: fashion-mnist}]",
                 "train.precision=fp32"]
    from torch._dynamo.utils import counters

    counters.clear()
    runs = {}
    for c in (False, True):
        out = tmp_path / str(c)
        loop.pretrain(load_recipe("sim", overrides=ov + [f"train.compile={str(c).lower()}"]), out, progress=False)
        runs[c] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for e, c in zip(runs[False], runs[True]):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-3, abs=1e-4), e["step"]
    assert counters["stats"]["unique_graphs"] >= 2  # the blocks really ran compiled (train and teacher)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])  # each unit one graph
    assert runs[True][0]["loss"] != runs[True][-1]["loss"]


@pytest.mark.parametrize("name", ["supervised", "simclr", "mocov3", "byol", "mae", "data2vec", "sim", "clip", "m3i"])
def test_compiled_units_have_no_graph_break(name, one_thread):
    """Every piece train.compile compiles traces as one graph in a full training step (dynamo's eager
    backend: the tracing, not the code generation), in every recipe: ViT blocks and their EMA
    copies, dense-decoder blocks with layer and batch norm (mae, sim), text-tower blocks (clip),
    ResNet blocks in the mixed input (m3i), each term's heads and its estimator's loss."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from m3i.layers import Block
    from m3i.train.strategy import compile_blocks

    ov = [f"terms.{i}.target_encoder.tower=scratch" for i in ({"clip": [0], "m3i": [2]}.get(name, []))]
    ov += ["backbone.depth=3"] if name == "data2vec" else []  # its teacher averages the top 3 blocks
    recipe = load_recipe(name, overrides=TINY + ov if name != "m3i" else TINY[2:] + ov)
    torch._dynamo.reset()
    counters.clear()
    obj, opt, sched, bad, step = setup(recipe)
    pieces = compile_blocks(obj, backend="eager")
    heads = [m for t in obj.terms for m in t.children() if not any(isinstance(x, Block) for x in m.modules())]
    assert pieces > len(heads) and all(getattr(m, "_compiled_call_impl", None) is not None for m in heads)
    assert all({"classes", "paired", "dense"} & set(vars(t.estimator)) for t in obj.terms)  # each loss compiled
    step(obj.stage(batch(0), torch.device("cpu")), 0)
    # the blocks and the losses (and the heads) each traced, and nothing broke
    assert counters["stats"]["unique_graphs"] >= 2
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def test_fp16_a_step_the_scaler_skips_is_counted_and_changes_no_weight():
    recipe = load_recipe("simclr", overrides=TINY + ["train.precision=fp16", "train.steps=10", "train.warmup_steps=0"])
    obj, opt, sched, bad, _ = setup(recipe)
    cpu = torch.device("cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # the scaled gradients overflow float16
    step = TrainStep(obj, obj, opt, sched, recipe.train, autocast_for(cpu, "fp16"), bad, scaler)
    before = {n: p.detach().clone() for n, p in obj.named_parameters()}
    torch.manual_seed(1)
    out = step(batch(0), 0)
    assert torch.isfinite(out["loss"])  # the loss was fine: the scale made the gradients overflow
    assert bad.read()[0] == 1
    assert all(torch.equal(p, before[n]) for n, p in obj.named_parameters())
    assert scaler.get_scale() == 2.0 ** 99  # backed off
    scaler.update(2.0 ** 10)  # a scale that fits: the next step trains, with the true (unscaled) gradients
    torch.manual_seed(2)
    step(batch(1), 1)
    assert bad.read()[0] == 1
    assert any(not torch.equal(p, before[n]) for n, p in obj.named_parameters() if p.requires_grad)
    assert scaler.get_scale() == 2.0 ** 10


def test_fp16_step_follows_the_fp32_step():
    """Under fp16 autocast with a scaler, the step's gradients (unscaled) are fp32's to fp16's precision."""
    recipe = load_recipe("mae", overrides=TINY + ["train.steps=10", "train.warmup_steps=0", "train.clip_grad=0"])
    cpu = torch.device("cpu")
    grads = []
    for precision in ("fp32", "fp16"):
        obj, opt, sched, bad, _ = setup(recipe)
        step = TrainStep(obj, obj, opt, sched, recipe.train, autocast_for(cpu, precision), bad,
                         make_scaler(cpu, precision))
        torch.manual_seed(1)
        step(batch(0), 0)
        assert bad.read()[0] == 0
        grads.append(torch.cat([p.grad.flatten() for p in obj.parameters() if p.grad is not None]))
    fp32, fp16 = grads
    assert float((fp16 - fp32).norm()) < 0.05 * float(fp32.norm())  # not off by the loss scale (65,536)


@pytest.mark.slow
@needs_data
def test_fp16_run_saves_its_loss_scale_in_the_checkpoint(tmp_path):
    from m3i.runs import checkpoint as ckpt

    recipe = load_recipe("mae", overrides=TINY + ["train.precision=fp16", "train.steps=2", "train.ckpt_every=1",
                                                  "train.log_every=1", "data.sources=[{spec: fashion-mnist}]"])
    loop.pretrain(recipe, tmp_path / "run", device="cpu", progress=False)
    _, state = ckpt.load(tmp_path / "run")
    bad = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["bad_steps"]
    # the scale starts at 2^16, halves at each skipped step and grows only after 2,000 good ones
    assert state["scaler"]["scale"] == 2.0 ** (16 - bad)
    assert make_scaler(torch.device("cpu"), "fp16", state["scaler"]).get_scale() == 2.0 ** (16 - bad)
