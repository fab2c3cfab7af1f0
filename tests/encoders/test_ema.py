"""The EMA teacher: its update φ ← m·φ + (1 − m)·θ, the cosine momentum schedule, the objective's
use of both, and a target encoder without stochastic depth.

The expected weights are computed here from saved copies of the teacher and the online network,
the expected momenta from the schedule's formula written out below and from hand-computed values.
"""
from __future__ import annotations

import math

import pytest
import torch

from m3i.backbones import build_backbone
from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.decoders.mlp import MLPHead
from m3i.encoders.copies import CopiedEncoder, ema_momentum

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = ["backbone.name=vit_micro", "backbone.depth=3", "backbone.embed_dim=64", "backbone.num_heads=4",
            "backbone.patch_size=8", "terms.0.decoder.projector=[32, 16]", "terms.0.decoder.predictor=[32, 16]"]


# ---------------------------------------------------------------------------- helpers
def online_and_teacher(seed: int = 0):
    """A ResNet (batch norm) with a batch-norm projector, its teacher, then the online side moved
    away from the copy: new weights, and running statistics set by hand (a copy starts at 0 and 1)."""
    torch.manual_seed(seed)
    backbone = build_backbone("resnet_nano", img_size=32, patch_size=8)
    heads = {"view": MLPHead(backbone.embed_dim, [24, 8], norm="batch")}
    teacher = CopiedEncoder(backbone, heads)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for net in (backbone, heads["view"]):
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
            for m in net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                    m.num_batches_tracked.fill_(7)
    return backbone, heads, teacher


def pairs(teacher: CopiedEncoder, backbone, heads):
    """(teacher module, online module) for the backbone and every head."""
    return [(teacher.backbone, backbone)] + [(teacher.heads[k], heads[k]) for k in heads]


def snapshot(module) -> tuple[dict, dict]:
    return ({n: p.detach().clone() for n, p in module.named_parameters()},
            {n: b.detach().clone() for n, b in module.named_buffers()})


def cosine(k: int, total: int, start: float, end: float) -> float:
    """m(k) = end − (end − start)·(cos(πk/K) + 1)/2."""
    return end - (end - start) * (math.cos(math.pi * k / total) + 1) / 2


# ---------------------------------------------------------------------------- the update
@pytest.mark.parametrize("m", [0.0, 0.3, 0.9, 0.996, 1.0])
def test_update_is_momentum_average_toward_online_weights(m):
    backbone, heads, teacher = online_and_teacher()
    before = [(snapshot(mine), snapshot(online)) for mine, online in pairs(teacher, backbone, heads)]
    teacher.update(backbone, heads, m)
    n_buffers = 0
    for (mine, online), ((phi, _), (theta, online_buffers)) in zip(pairs(teacher, backbone, heads), before):
        for name, p in mine.named_parameters():
            old, new, target = phi[name].double(), p.detach().double(), theta[name].double()
            if m == 1.0:
                assert torch.equal(p, phi[name]), name          # full momentum: the teacher stays
            elif m == 0.0:
                assert torch.equal(p, theta[name]), name        # no momentum: the teacher is a copy
            torch.testing.assert_close(new, m * old + (1 - m) * target, rtol=1e-6, atol=1e-6)
            # toward θ, not away: the gap to the online weights shrinks by exactly the factor m
            gap_before, gap_after = float((old - target).norm()), float((new - target).norm())
            assert gap_after == pytest.approx(m * gap_before, rel=1e-5, abs=1e-6), name
            assert float((new - old).norm()) == pytest.approx((1 - m) * gap_before, rel=1e-5, abs=1e-6), name
        for name, b in mine.named_buffers():                    # running statistics: copied, whatever m
            assert torch.equal(b, online_buffers[name]), name
            n_buffers += 1
        for name, p in online.named_parameters():               # the online side is read, never written
            assert torch.equal(p, theta[name]), name
    assert n_buffers >= 3 * 4  # every batch norm of the ResNet and of the projector was checked


def test_skip_leaves_every_parameter_and_buffer_unchanged():
    backbone, heads, teacher = online_and_teacher(seed=2)
    before = [snapshot(mine) for mine, _ in pairs(teacher, backbone, heads)]
    teacher.update(backbone, heads, 0.5, skip=torch.tensor(True))
    for (mine, _), (phi, buffers) in zip(pairs(teacher, backbone, heads), before):
        for name, p in mine.named_parameters():
            assert torch.equal(p, phi[name]), name
        for name, b in mine.named_buffers():
            assert torch.equal(b, buffers[name]), name


def test_skip_false_is_the_plain_update():
    backbone, heads, teacher = online_and_teacher(seed=3)
    before = [(snapshot(mine), snapshot(online)) for mine, online in pairs(teacher, backbone, heads)]
    teacher.update(backbone, heads, 0.75, skip=torch.tensor(False))
    for (mine, _), ((phi, _), (theta, online_buffers)) in zip(pairs(teacher, backbone, heads), before):
        for name, p in mine.named_parameters():
            torch.testing.assert_close(p.detach().double(), 0.75 * phi[name].double() + 0.25 * theta[name].double(),
                                       rtol=1e-6, atol=1e-6)
        for name, b in mine.named_buffers():
            assert torch.equal(b, online_buffers[name]), name


# ---------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("start, end", [(0.99, 1.0), (0.996, 1.0), (0.9, 0.999), (0.0, 1.0), (0.5, 0.5)])
@pytest.mark.parametrize("total", [7, 100, 12345])
def test_momentum_schedule_is_the_cosine_formula(start, end, total):
    for k in sorted({0, 1, 2, total // 4, total // 3, total // 2, total - 1, total}):
        assert ema_momentum(k, total, start, end) == pytest.approx(cosine(k, total, start, end), abs=1e-12), k
    assert ema_momentum(0, total, start, end) == pytest.approx(start, abs=1e-12)
    assert ema_momentum(total, total, start, end) == pytest.approx(end, abs=1e-12)
    assert ema_momentum(total + 5, total, start, end) == pytest.approx(end, abs=1e-12)  # past the end: stays
    values = [ema_momentum(k, total, start, end) for k in range(0, total + 1, max(1, total // 500))]
    assert all(b >= a - 1e-15 for a, b in zip(values, values[1:]))  # non-decreasing when end ≥ start
    assert min(values) >= start - 1e-12 and max(values) <= end + 1e-12


def test_momentum_schedule_at_hand_computed_steps():
    # cos(π/3) = ½, cos(π/2) = 0, cos(2π/3) = −½: a quarter, half and three quarters of the way
    start, end, total = 0.9, 0.99, 12
    assert ema_momentum(4, total, start, end) == pytest.approx(0.9225, abs=1e-12)
    assert ema_momentum(6, total, start, end) == pytest.approx(0.945, abs=1e-12)
    assert ema_momentum(8, total, start, end) == pytest.approx(0.9675, abs=1e-12)
    # cos(π/4) = √2/2: (1 − √2/2)/2 of the way
    assert ema_momentum(3, total, start, end) == pytest.approx(0.9 + 0.09 * (1 - math.sqrt(0.5)) / 2, abs=1e-12)


# ---------------------------------------------------------------------------- the objective
def test_objective_update_teacher_follows_the_schedule():
    torch.manual_seed(0)
    start, end, total = 0.5, 0.9, 6
    obj = Objective(load_recipe("byol", overrides=TINY_VIT + [f"ema.momentum={start}", f"ema.end={end}"])).train()
    term = obj.terms[0]
    g = torch.Generator().manual_seed(1)
    # m(k) at k = 0, 2, 3, 4, 6 of 6: cos(πk/6) = 1, ½, 0, −½, −1
    for step, want in [(0, 0.5), (2, 0.6), (3, 0.7), (4, 0.8), (6, 0.9)]:
        with torch.no_grad():  # an optimiser step moves the online weights
            for p in obj.backbone.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            for p in term.decoder.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        checked = [(obj.teacher.backbone, obj.backbone), (obj.teacher.heads["view"], term.decoder)]
        before = [(snapshot(mine)[0], snapshot(online)[0]) for mine, online in checked]
        m = obj.update_teacher(step, total)
        assert m == pytest.approx(want, abs=1e-12)
        assert m == pytest.approx(cosine(step, total, start, end), abs=1e-12)
        for (mine, _), (phi, theta) in zip(checked, before):
            for name, p in mine.named_parameters():
                expected = want * phi[name].double() + (1 - want) * theta[name].double()
                torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-6)
    # a skipped step: the schedule's momentum comes back, the teacher does not move
    checked = [obj.teacher.backbone, obj.teacher.heads["view"]]
    before = [snapshot(mine)[0] for mine in checked]
    assert obj.update_teacher(3, total, skip=torch.tensor(True)) == pytest.approx(0.7, abs=1e-12)
    for mine, phi in zip(checked, before):
        for name, p in mine.named_parameters():
            assert torch.equal(p, phi[name]), name


# ---------------------------------------------------------------------------- no drop-path
def test_teacher_runs_without_drop_path_in_train_mode():
    torch.manual_seed(0)
    obj = Objective(load_recipe("byol", overrides=TINY_VIT + ["backbone.drop_path_rate=0.5"])).train()
    assert obj.teacher.training and obj.teacher.backbone.training and obj.backbone.training
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    with torch.no_grad():
        t1 = obj.teacher.backbone.forward_features(x)
        t2 = obj.teacher.backbone.forward_features(x)
        o1 = obj.backbone.forward_features(x)
        o2 = obj.backbone.forward_features(x)
    assert torch.equal(t1.pooled, t2.pooled) and torch.equal(t1.tokens, t2.tokens)
    # the online backbone keeps its stochastic depth: residual branches dropped at random
    assert not torch.allclose(o1.pooled, o2.pooled, atol=1e-3)
    # and the same after an EMA step
    obj.update_teacher(1, 10)
    with torch.no_grad():
        t3 = obj.teacher.backbone.forward_features(x)
        t4 = obj.teacher.backbone.forward_features(x)
    assert torch.equal(t3.pooled, t4.pooled)


def test_teacher_head_keeps_batch_statistics_in_train_mode():
    # BYOL's target projector normalises with the statistics of the batch it sees (a teacher
    # without drop-path is still in train mode)
    torch.manual_seed(0)
    obj = Objective(load_recipe("byol", overrides=TINY_VIT + ["backbone.drop_path_rate=0.5"])).train()
    head = obj.teacher.heads["view"]
    g = torch.Generator().manual_seed(3)
    pooled = torch.randn(8, obj.backbone.embed_dim, generator=g)
    with torch.no_grad():
        whole, half = head(pooled), head(pooled[:4])
    # the first four rows normalised over 8 rows or over 4: different outputs (running statistics
    # would give the same)
    assert not torch.allclose(whole[:4], half, atol=1e-4)


def test_teacher_constructor_zeroes_drop_path_and_leaves_the_online_network_alone():
    from m3i.layers import DropPath

    backbone = build_backbone("vit_micro", img_size=32, patch_size=8, depth=3, embed_dim=64, num_heads=4,
                              drop_path_rate=0.5)
    rates = [m.p for m in backbone.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.0, 0.25, 0.5])          # linear from 0 to the rate over 3 blocks
    teacher = CopiedEncoder(backbone, {})
    assert [m.p for m in teacher.modules() if isinstance(m, DropPath)] == [0.0, 0.0, 0.0]
    assert [m.p for m in backbone.modules() if isinstance(m, DropPath)] == pytest.approx([0.0, 0.25, 0.5])
