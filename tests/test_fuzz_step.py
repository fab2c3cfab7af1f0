"""Every configuration that validates builds and trains.

Hypothesis draws a shipped recipe and overrides that change how its parts combine (views swapped,
masked or plain sources, input modes, mask kinds, backbones, estimator settings, the views each
term reads). Whatever ``load_recipe`` accepts must build its objective and take one optimiser
step on a CPU batch with labels and captions on some samples, giving a finite loss whose
gradient reaches the backbone; nothing that validates may fail later. Sizes are tiny (16 px, a
4 × 4 grid, one block) so that each example takes a fraction of a second.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from m3i.config import ConfigError, load_recipe, recipe_names
from m3i.objective import Objective

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "vit_micro": ["backbone.name=vit_micro", "backbone.depth=3", "backbone.embed_dim=32", "backbone.num_heads=2",
                  "backbone.patch_size=4"],
    "resnet_nano": ["backbone.name=resnet_nano", "backbone.patch_size=4"],
    "convnext_atto": ["backbone.name=convnext_atto", "backbone.dims=[8,8,16,16]", "backbone.depths=[1,1,1,3]",
                      "backbone.patch_size=8"],
}
SIZE = ["backbone.img_size=16", "data.image_size=16", "data.batch_size=8"]


def small_parts(recipe) -> list[str]:
    """Overrides shrinking each term's own modules (text towers, decoders) to test sizes."""
    out = []
    for i, t in enumerate(recipe.terms):
        if t.target_encoder.kind == "text":
            out += [f"terms.{i}.target_encoder.tower=scratch", f"terms.{i}.target_encoder.width=16",
                    f"terms.{i}.target_encoder.depth=1", f"terms.{i}.target_encoder.heads=2"]
        if t.decoder.kind in ("dense", "text"):
            out += [f"terms.{i}.decoder.width=16", f"terms.{i}.decoder.heads=2", f"terms.{i}.decoder.depth=1"]
    return out


def term_overrides(i: int) -> st.SearchStrategy[str]:
    return st.sampled_from([
        f"terms.{i}.source.masked=true", f"terms.{i}.source.masked=false",
        f"terms.{i}.source.view=1", f"terms.{i}.target.view=1", f"terms.{i}.target.view=0",
        f"terms.{i}.target_encoder.head=true", f"terms.{i}.target_encoder.top_k=1",
        f"terms.{i}.target_encoder.norm=instance", f"terms.{i}.decoder.cls_token=true",
        f"terms.{i}.decoder.queries=target_view", f"terms.{i}.target.paired=true",
        f"terms.{i}.estimator.learn_temperature=true",
    ])


GLOBAL = st.sampled_from(["views.count=2", "views.input_mode=fill", "views.input_mode=mix", "views.input_mode=drop",
                          "views.mask.kind=random", "views.count=1", "views.mask.ratio=0.5"])


@st.composite
def configs(draw):
    """A recipe, a tiny backbone and overrides: a few global ones, and per term a few of its own."""
    name = draw(st.sampled_from(recipe_names()))
    n_terms = len(load_recipe(name).terms)
    backbone = draw(st.sampled_from(sorted(TINY)))
    picks = draw(st.lists(GLOBAL, max_size=2, unique=True))
    for i in range(n_terms):
        if draw(st.booleans()):
            picks.append(f"terms.{i}.swap_views=true")
        picks += draw(st.lists(term_overrides(i), max_size=2, unique=True))
    return name, backbone, picks


def batch(b: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (b,), generator=g)
    label[::3] = -1
    caption = [None if i % 4 == 1 else f"a picture number {i % 3}" for i in range(b)]
    return {"image": torch.randint(0, 256, (b, 3, 16, 16), generator=g, dtype=torch.uint8),
            "label": label, "caption": caption}


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_every_recipe_that_validates_builds_and_trains_a_step(cfg):
    name, backbone, picks = cfg
    base = TINY[backbone] + SIZE
    try:
        recipe = load_recipe(name, overrides=base + picks)
        recipe = load_recipe(name, overrides=base + picks + small_parts(recipe))
    except ConfigError:
        event("refused")
        return
    event("accepted")
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=3).train()
    opt = torch.optim.AdamW(obj.param_groups(0.05), lr=1e-3)
    out = obj(batch())
    loss = out["loss"]
    assert math.isfinite(float(loss.detach())), (name, backbone, picks, {k: float(v.detach()) for k, v in out.items()})
    loss.backward()
    grads = [p.grad for p in obj.backbone.parameters() if p.requires_grad]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads), (name, backbone, picks)
    opt.step()
    obj.update_teacher(1, recipe.train.steps)
