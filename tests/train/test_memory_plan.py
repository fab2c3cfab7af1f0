"""The dry run's memory plan (`m3i pretrain --dry-run --gpu-memory`): its figures against the peak
the CPU allocator reaches in the trainer's own steps, its arithmetic per strategy, and its one-line
refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m3i.cli import main
from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.train import memory
from m3i.train.dryrun import synthetic_batch

pytestmark = pytest.mark.usefixtures("one_thread")

# every kind of term (dense decoder and EMA teacher, class table, a trained text tower, the
# global views' heads) on a ViT-Ti of 4 blocks at 32 px (64 tokens): activations and the
# parameters' share of memory of the same order
SMALL = ["backbone.name=vit_tiny", "backbone.depth=4", "terms.2.target_encoder.tower=scratch"]
BATCH, CLASSES = 64, 10


def plan_and_peak(overrides: list[str]) -> tuple[dict[str, float], int]:
    """The dry run's plan for one process and the most memory the CPU allocator held during the
    trainer's first two steps, for the ``m3i`` recipe with ``overrides`` on a batch of BATCH, both
    made in a fresh interpreter (``peak_memory.py``): nothing another test left in this process counts."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("peak_memory.py")), str(BATCH), str(CLASSES),
                          *overrides], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    got = json.loads(out.stdout.splitlines()[-1])
    return got["plan"], got["peak"]


@pytest.mark.parametrize("precision, ckpt, accum", [
    ("fp32", False, 1), ("bf16", True, 1),
    pytest.param("bf16", False, 2, marks=pytest.mark.slow), pytest.param("fp32", True, 4, marks=pytest.mark.slow)])
def test_the_plan_is_within_15_percent_of_the_peak_the_allocator_measures(precision, ckpt, accum):
    overrides = SMALL + [f"train.precision={precision}", f"train.accum_steps={accum}",
                         f"backbone.grad_checkpointing={str(ckpt).lower()}"]
    plan, peak = plan_and_peak(overrides)
    assert plan["total"] == pytest.approx(peak, rel=0.15)
    # the activations alone: the peak beyond the parameters, gradients and optimiser state (exact counts)
    static = plan["parameters"] + plan["gradients"] + plan["optimiser"]
    assert plan["activations"] == pytest.approx(peak - static, rel=0.15)
    assert plan["activations"] > 0.15 * plan["total"]  # a share that a wrong count would show


def test_fake_tensors_keep_what_real_ones_keep():
    """The plan's fake step keeps the bytes a real step on the CPU keeps (to a few small tensors)."""
    recipe = load_recipe("m3i", overrides=SMALL + ["train.precision=bf16"])

    def make(b):
        return synthetic_batch(recipe, b, CLASSES)

    fake = memory.measure_activations(recipe, CLASSES, make)
    real = memory.measure_activations(recipe, CLASSES, make, fake=False)
    for got, want in ((fake.saved, real.saved), (fake.outside, real.outside), (fake.unit_call, real.unit_call)):
        assert got == pytest.approx(want, rel=1e-2)
    assert fake.unit_copies == real.unit_copies
    assert fake.kept_per_image == pytest.approx(real.kept_per_image)
    assert fake.unit_copies > 0  # bf16 autocast keeps a bfloat16 copy of every block's weights


def test_the_plan_per_strategy_follows_the_counts():
    recipe = load_recipe("m3i-vitb16", overrides=["terms.2.target_encoder.tower=scratch"])
    with torch.device("meta"):
        obj = Objective(recipe, 1000)
    p = memory.count_parameters(obj)
    trainable = 4 * sum(x.numel() for x in obj.parameters() if x.requires_grad)
    everything = 4 * sum(x.numel() for x in obj.parameters()) + sum(b.numel() * b.element_size() for b in obj.buffers())
    assert (p.trainable, p.total) == (trainable, everything)
    gib = 1 << 30
    # kept: 1 GiB + 1 GiB an image; checkpointed: 0.5 GiB an image outside the units, a unit's call
    # 0.125 GiB an image; autocast's copies of the units' weights 0.5 GiB
    acts = memory.Activations((2, 4), (3 * gib, 5 * gib), (gib, 2 * gib), (gib // 4, gib // 2), gib // 2, 1 << 20)
    ddp = memory.per_rank(p, acts, "ddp", 1, 512, False, "bf16")
    assert (ddp["parameters"], ddp["gradients"], ddp["optimiser"]) == (everything, 2 * trainable, 2 * trainable)
    assert ddp["activations"] == 513 * gib
    assert memory.per_rank(p, acts, "fsdp", 8, 512, False, "bf16")["activations"] == 512.5 * gib  # no copies
    assert memory.per_rank(p, acts, "ddp", 1, 64, True, "bf16")["activations"] == 32 * gib + 8 * gib
    assert memory.per_rank(p, acts, "ddp", 1, 2, True, "bf16")["activations"] == 1 * gib + 0.5 * gib  # the copies
    assert memory.per_rank(p, acts, "ddp", 1, 64, True, "bf16", accum=4)["activations"] == 10 * gib + 64 * (1 << 20)
    # HSDP over 8 GPUs of each of 8 nodes holds per rank what FSDP over 8 GPUs does
    h, f = (memory.per_rank(p, acts, s, 8, 64, True, "bf16") for s in ("hsdp", "fsdp"))
    assert h == f and f["optimiser"] == pytest.approx(2 * ((trainable - p.trainable_whole) / 8 + p.trainable_whole))
    assert f["parameters"] < ddp["parameters"] and f["gradients"] < ddp["gradients"] / 2
    info = memory.plan(p, acts, recipe, gpus=64, nodes=8, gpu_memory=80 << 30)
    for row in info["rows"]:
        usable = 0.9 * (80 << 30)

        def total(micro, row=row):
            return memory.per_rank(p, acts, row["strategy"], row["shards"], 64, row["ckpt"], "bf16", 64 / micro)["total"]

        m = row["micro_batch"]
        assert m == 64 or (total(m) <= usable < total(m + 1) if m else total(1) > usable)
        assert row["fits"] == (m == 64)
        k = row["accum_steps"]  # the fewest micro-batches of at most m that cut 64 in halves (the mixed input)
        assert k == next((k for k in (1, 2, 4, 8, 16, 32) if 64 // k <= m), None) if m else k is None


def test_sizes_and_launches_are_read_or_refused_in_one_line(capsys):
    assert memory.parse_size("80GiB") == 80 << 30
    assert memory.parse_size("80GB") == 80 * 10 ** 9
    assert memory.parse_size("40960MiB") == 40 << 30
    assert memory.check_launch(64, None) == 8 and memory.check_launch(4, None) == 1
    for args, said in (
        (["--gpu-memory", "80XB"], "--gpu-memory 80XB: expected a size such as 80GiB, 80GB or 40960MiB"),
        (["--gpus", "0", "--gpu-memory", "80GiB"], "--gpus 0: expected a number of GPUs >= 1"),
        (["--gpus", "8", "--nodes", "3", "--gpu-memory", "80GiB"],
         "--nodes 3: expected a number of nodes >= 1 that divides --gpus 8"),
    ):
        assert main(["pretrain", "--recipe", "m3i", "--dry-run", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"m3i pretrain: error: {said}"
