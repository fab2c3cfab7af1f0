"""``setup.ready_run``: the objective's training step as pre-training builds it (the loop's run
and the benchmarks' step, which has no loader and no run folder, are this one)."""
import pytest
import torch

from m3i.config import load_recipe
from m3i.train import setup
from m3i.train.dryrun import synthetic_batch
from m3i.train.strategy import compile_blocks

TINY = ["backbone.name=vit_micro", "backbone.depth=1", "train.precision=fp32", "train.warmup_steps=4",
        "train.lr=2e-3", "data.batch_size=4"]
CPU = torch.device("cpu")


def test_a_ready_run_is_the_recipes_optimizer_schedule_and_step(one_thread):
    recipe = load_recipe("sim", overrides=TINY)
    objective = setup.make_objective(recipe, 0, CPU)
    run = setup.ready_run(recipe, objective, CPU)
    assert run.task is objective and run.model is objective and list(run.batches) == [] and run.compiled == 0
    assert isinstance(run.opt, torch.optim.AdamW) and all(g["fused"] for g in run.opt.param_groups)
    # every trainable parameter once, in the groups the objective asks for (no decay on norms and biases)
    trained = [p for p in objective.parameters() if p.requires_grad]
    grouped = [p for g in run.opt.param_groups for p in g["params"]]
    assert len(grouped) == len(trained) and {id(p) for p in grouped} == {id(p) for p in trained}
    assert [g["weight_decay"] for g in run.opt.param_groups] == [recipe.train.weight_decay, 0.0]
    # linear warm-up of 4 steps: the first step at lr / 5, then 2/5 after it
    assert run.opt.param_groups[0]["lr"] == pytest.approx(2e-3 / 5)
    before = [p.detach().clone() for p in trained]
    losses = run.step(objective.stage(synthetic_batch(recipe, 4, 0), CPU), 0)
    assert torch.isfinite(losses.loss) and run.opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 2 / 5)
    assert any(not torch.equal(a, p) for a, p in zip(before, trained))  # the step trained
    assert int(run.step.bad.total) == 0


def test_a_ready_run_compiles_what_train_compile_compiles(one_thread):
    recipe = load_recipe("sim", overrides=TINY + ["train.compile=true"])
    run = setup.ready_run(recipe, setup.make_objective(recipe, 0, CPU), CPU)
    expected = compile_blocks(setup.make_objective(recipe, 0, CPU))  # the same pieces on a fresh objective
    assert run.compiled == expected > 0
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in run.task.backbone.blocks)
