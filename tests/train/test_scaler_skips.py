"""fp16's gradient scaler skips steps of its own (a finite loss whose scaled gradients overflowed
float16, the scale then halved): they are counted apart from the faults, hold a row of faults
without adding to it, and once the scale is below 1 an overflow is a fault again."""
import torch

from m3i.config import load_recipe
from m3i.device import autocast_for
from m3i.objective import Objective
from m3i.train import loop
from m3i.train.step import BadSteps, Skips, TrainStep, make_optimizer

TINY = ["backbone.name=vit_nano", "backbone.depth=2", "data.batch_size=8", "data.num_workers=0",
        "train.precision=fp16", "train.steps=10", "train.warmup_steps=0"]
CPU = torch.device("cpu")


def batch(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            "label": torch.randint(0, 10, (n,), generator=g), "caption": [None] * n}


def fp16_step(init_scale: float, infinite_gradients: bool) -> tuple[TrainStep, BadSteps, torch.amp.GradScaler]:
    recipe = load_recipe("simclr", overrides=TINY)
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=10)
    opt = make_optimizer(obj.param_groups(recipe.train.weight_decay), recipe.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.lr_lambda(recipe.train))
    bad, scaler = BadSteps(CPU), torch.amp.GradScaler("cpu", init_scale=init_scale)
    if infinite_gradients:  # at any scale: the loss is finite, a gradient is not
        param = next(p for p in obj.parameters() if p.requires_grad)
        param.register_hook(lambda g: torch.full_like(g, float("inf")))
    return TrainStep(obj, obj, opt, sched, recipe.train, autocast_for(CPU, "fp16"), bad, scaler), bad, scaler


def test_an_overflow_at_a_scale_of_one_or_more_is_the_scalers_skip_below_it_a_fault():
    for scale, by_scaler in ((2.0 ** 16, 1), (1.0, 1), (0.5, 0)):
        step, bad, scaler = fp16_step(scale, infinite_gradients=True)
        out = step(batch(0), 0)
        assert torch.isfinite(out["loss"])
        total, in_row, worst = bad.read()
        assert (total, bad.scaler_total, in_row, worst) == (1, by_scaler, 1 - by_scaler, 1 - by_scaler), scale
        assert scaler.get_scale() == scale / 2  # skipped either way, and the scale backed off


def test_the_loop_tells_scaler_skips_apart_and_they_hold_a_row_of_faults():
    bad = BadSteps(CPU, total=3, scaler=1)  # resumed: 3 skipped before, 1 of them the scaler's
    skips = Skips(bad, start=10, scaler=torch.amp.GradScaler("cpu", init_scale=8.0))
    assert skips.faults == skips.faults_before == 2
    flags = [(1, 0), (1, 1), (1, 0), (0, 0), (1, 1)]  # (skipped, by the scaler)
    for skipped, by_scaler in flags[:3]:
        bad.add(torch.tensor(bool(skipped)), torch.tensor(bool(by_scaler)))
    said = []
    assert skips.read(13, said.append) == 2  # fault, scaler skip, fault: a row of 2 faults
    assert said == ["step 13: 2 step(s) skipped since step 10 (loss or gradients not finite; 2 in a row now, 4 in all)",
                    "step 13: 1 step(s) skipped by the fp16 gradient scaler since step 10: their scaled gradients "
                    "overflowed float16, so it lowered its loss scale (now 8), as it does until the gradients fit; "
                    "no fault of the data or the learning rate"]
    for skipped, by_scaler in flags[3:]:
        bad.add(torch.tensor(bool(skipped)), torch.tensor(bool(by_scaler)))
    said.clear()
    assert skips.read(15, said.append) == 2 and skips.in_row == 0  # a taken step ended the row
    assert said == [said[0]] and said[0].startswith("step 15: 1 step(s) skipped by the fp16 gradient scaler")
    assert {k: v for k, v in skips.counters().items() if k != "scaler"} == {"bad_steps": 7, "scaler_skips": 3}
