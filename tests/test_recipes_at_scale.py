"""The recipes at the scale people run (ViT-B/16 and ViT-L/16 at 224 px): each builds on the meta
device at its published size, resolves its learning rate per 256 images, and trains two steps on
the CPU at a tiny batch with gradient checkpointing (sizes shrunk by overrides, the same code path)."""
from __future__ import annotations

import json

import pytest
import torch

from m3i.config import load_recipe, recipe_names
from m3i.objective import Objective
from conftest import needs_data

SCALE = ["sim-vitb16", "mae-vitb16", "clip-vitb16", "supervised-vitb16", "m3i-vitb16", "m3i-vitl16"]


def vit_parameters(dim: int, depth: int, patch: int = 16, image: int = 224, chans: int = 3) -> int:
    """A ViT's parameter count from its shapes: patch embedding, class token, positions, blocks
    (qkv 3D²+3D, projection D²+D, MLP 8D²+5D, two norms 4D) and the final norm."""
    tokens = (image // patch) ** 2 + 1
    block = 12 * dim * dim + 13 * dim
    return chans * patch * patch * dim + dim + dim + tokens * dim + depth * block + 2 * dim


def test_the_scale_recipes_are_listed():
    assert set(SCALE) <= set(recipe_names())


@pytest.mark.parametrize("name", SCALE)
def test_recipe_builds_on_the_meta_device_at_its_published_size(name):
    recipe = load_recipe(name)
    assert (recipe.backbone.img_size, recipe.backbone.patch_size, recipe.data.image_size) == (224, 16, 224)
    with torch.device("meta"):
        obj = Objective(recipe, num_classes=1000)
    n = sum(p.numel() for p in obj.backbone.parameters())
    dim, depth, published = {"vit_base": (768, 12, 86e6), "vit_large": (1024, 24, 304e6)}[recipe.backbone.name]
    assert n == vit_parameters(dim, depth)
    assert abs(n - published) < 0.01 * published  # ViT-B/16 ≈ 86 M, ViT-L/16 ≈ 304 M (Dosovitskiy et al.)
    assert all(p.is_meta for p in obj.parameters())


def test_learning_rate_per_256_images_scales_with_the_global_batch():
    sim = load_recipe("sim-vitb16")
    assert sim.train.lr == pytest.approx(1e-3)  # SIM's 6.25e-5 per 256 at 4,096
    assert load_recipe("sim-vitb16", overrides=["data.batch_size=1024"]).train.lr == pytest.approx(2.5e-4)
    assert load_recipe("mae-vitb16").train.lr == pytest.approx(1.5e-4 * 16)


def test_min_lr_above_the_lr_blr_makes_is_refused():
    from m3i.config import ConfigError

    # supervised-vitb16: blr 2.5e-4 and min_lr 1e-5; at a batch of 8 the lr is 2.5e-4 · 8 / 256 = 7.8125e-6
    with pytest.raises(ConfigError, match=r"train.min_lr: 1e-05 is above the lr 7.8125e-06 train.blr 0.00025 makes"):
        load_recipe("supervised-vitb16", overrides=["data.batch_size=8"])
    assert load_recipe("supervised-vitb16", overrides=["data.batch_size=8", "train.min_lr=0"]).train.lr == \
        pytest.approx(2.5e-4 * 8 / 256)


def test_lr_beside_a_different_blr_is_refused():
    from m3i.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.lr: 0.01 is given beside train.blr 6.25e-05"):
        load_recipe("sim-vitb16", overrides=["train.lr=0.01"])
    # a run's saved config holds both, agreeing: it loads
    saved = load_recipe("sim-vitb16").model_dump(mode="json")
    from m3i.config import validate

    assert validate(saved, "config.yaml").train.lr == pytest.approx(1e-3)


# the built-in data at 32 px: 2 × 2 patches of 16; the backbone 2 blocks deep at its full width
TINY_RUN = ["backbone.img_size=32", "data.image_size=32", "backbone.depth=2", "data.batch_size=8",
            "data.num_workers=0", "train.steps=2", "train.warmup_steps=1", "train.log_every=1",
            "backbone.grad_checkpointing=true",
            "train.min_lr=0",  # blr at a batch of 8 makes lr smaller than the recipes' min_lr, which is refused
            "data.sources=[{spec: 'fashion-mnist:train', captions: false}, {spec: 'emoji:train', labels: false}]"]
M3I_SHRINK = ["terms.0.decoder.projector_depth=1", "terms.0.decoder.depth=1",
              # a small text tower trained from scratch: MiniLM's embedding of every caption takes longer
              "terms.2.target_encoder.tower=scratch", "terms.2.target_encoder.width=64", "terms.2.target_encoder.depth=1"]
SHRINK = {  # decoders kept at their width, fewer blocks
    "sim-vitb16": ["terms.0.decoder.projector_depth=1", "terms.0.decoder.depth=1"],
    "mae-vitb16": ["terms.0.decoder.depth=1"],
    "clip-vitb16": ["terms.0.target_encoder.depth=1"],
    "supervised-vitb16": [],
    "m3i-vitb16": M3I_SHRINK,
    "m3i-vitl16": M3I_SHRINK + ["backbone.depth=1"],
}


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("name", SCALE)
def test_two_steps_train_on_the_cpu_with_gradient_checkpointing(name, tmp_path):
    from m3i.train.loop import pretrain

    recipe = load_recipe(name, overrides=TINY_RUN + SHRINK[name])
    assert recipe.backbone.grad_checkpointing
    ckpt = pretrain(recipe, tmp_path / "run", device="cpu", progress=False)
    assert ckpt is not None and (ckpt / "model.safetensors").is_file()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        assert all(torch.isfinite(torch.tensor(r[t.name])) for t in recipe.terms)
    assert lines[-1]["bad_steps"] == 0
