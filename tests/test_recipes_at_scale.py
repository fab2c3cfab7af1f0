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
SCALE += ["siglip-vitb16", "coca-vitb16", "m3i-one-vitb16"]
SCALE += ["dino-vitb16", "dinov2-vitl14"]
PATCH = {"dinov2-vitl14": 14}  # the others: 16


def vit_parameters(dim: int, depth: int, patch: int = 16, image: int = 224, chans: int = 3, hidden: int = 0) -> int:
    """A ViT's parameter count from its shapes: patch embedding, class token, positions, blocks
    (qkv 3D²+3D, projection D²+D, MLP 2DH+H+D with H = ``hidden`` or 4D, two norms 4D) and the
    final norm."""
    tokens = (image // patch) ** 2 + 1
    hidden = hidden or 4 * dim
    block = 4 * dim * dim + 2 * dim * hidden + 9 * dim + hidden
    return chans * patch * patch * dim + dim + dim + tokens * dim + depth * block + 2 * dim


def test_the_scale_recipes_are_listed():
    assert set(SCALE) <= set(recipe_names())


@pytest.mark.parametrize("name", SCALE)
def test_recipe_builds_on_the_meta_device_at_its_published_size(name):
    recipe = load_recipe(name)
    patch = PATCH.get(name, 16)
    assert (recipe.backbone.img_size, recipe.backbone.patch_size, recipe.data.image_size) == (224, patch, 224)
    with torch.device("meta"):
        obj = Objective(recipe, num_classes=1000)
    n = sum(p.numel() for p in obj.backbone.parameters())
    dim, depth, published = {"vit_base": (768, 12, 86e6), "vit_large": (1024, 24, 304e6)}[recipe.backbone.name]
    mask_token = dim if recipe.views.input_mode == "fill" else 0
    assert n == vit_parameters(dim, depth, patch) + mask_token
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
    "siglip-vitb16": ["terms.0.target_encoder.depth=1"],
    "coca-vitb16": ["terms.0.target_encoder.depth=1", "terms.1.decoder.depth=1"],
    "m3i-one-vitb16": M3I_SHRINK + ["terms.3.decoder.depth=1"],
    # the heads at their widths with fewer prototypes; local crops of one patch; ViT-L/14 at 28 px
    "dino-vitb16": ["terms.0.decoder.prototypes=4096", "views.local.size=16"],
    "dinov2-vitl14": ["backbone.img_size=28", "data.image_size=28", "backbone.depth=1", "views.local.size=14",
                      "terms.0.decoder.prototypes=4096", "terms.1.decoder.prototypes=4096"],
}


SHRINK["m3i-vitg14"] = [  # its terms: dense, caption, view; patches of 14 on a 28 px image, 128 wide
    "backbone.img_size=28", "data.image_size=28", "backbone.depth=1", "backbone.embed_dim=128",
    "terms.0.decoder.projector_depth=1", "terms.0.decoder.depth=1", "terms.0.decoder.width=64",
    "terms.1.target_encoder.width=64", "terms.1.target_encoder.depth=1", "terms.1.target_encoder.heads=4",
    "terms.2.decoder.projector=[256, 256, 64]", "terms.2.decoder.predictor=[256, 64]"]


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("name", SCALE + ["m3i-vitg14"])
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


# -- the billion-parameter recipe --------------------------------------------------------------------
def test_the_billion_recipe_builds_on_the_meta_device_at_its_published_size():
    """ViT-g/14 (timm's vit_giant_patch14_224: width 1,408, 40 blocks, MLP 6,144): 1.01 B parameters."""
    assert "m3i-vitg14" in recipe_names()
    recipe = load_recipe("m3i-vitg14")
    assert (recipe.backbone.img_size, recipe.backbone.patch_size, recipe.data.image_size) == (224, 14, 224)
    with torch.device("meta"):
        obj = Objective(recipe, num_classes=0)
    n = sum(p.numel() for p in obj.backbone.parameters())
    assert n == vit_parameters(1408, 40, patch=14, hidden=6144) == 1_011_202_432  # timm's count of its model
    assert all(p.is_meta for p in obj.parameters())
    assert recipe.train.lr == pytest.approx(2e-4 * (4096 / 1024) ** 0.5)  # DINOv2's ViT-g rule at 4,096
    assert recipe.train.steps * recipe.data.batch_size == pytest.approx(30 * 427_252_770, rel=1e-6)  # 30 epochs


@pytest.fixture(scope="module")
def billion():
    """The billion recipe's dry run on 8 GPUs of 80 GiB (FLOPs and memory on fake tensors)."""
    from m3i.train.dryrun import dry_run

    return dry_run(load_recipe("m3i-vitg14"), gpus=8, gpu_memory="80GiB", gpu_check="/nonexistent.json")


def vit_forward_flops(dim: int, hidden: int, depth: int, tokens: int) -> int:
    """A ViT's blocks, forward, per image: 2 FLOPs a multiply-add of the qkv, projection and MLP
    matmuls (4D² + 2DH a token) and attention's two products (2·N·D a token each)."""
    return depth * (2 * (4 * dim * dim + 2 * dim * hidden) * tokens + 4 * tokens * tokens * dim)


@pytest.mark.slow  # the full-size step on fake tensors
def test_the_billion_recipes_step_costs_what_the_hand_count_says(billion):
    """Per image, forward + backward twice the forward: the online ViT-g on 129 tokens (half of the
    256 patches, the mixed input's, and the class token), run once more in the backward pass by
    gradient checkpointing; its frozen patch embedding on all 256 patches, forward only; the EMA
    ViT-g on the other view's 257 tokens and its copy of the dense projector (embedding and 2
    blocks of 1,024), forward only; the dense decoder (embedding, 2 projector blocks on 129 tokens,
    4 predictor blocks on those and 256 queries, the queries' position map and the output); UniGrad's
    correlation; the text tower trained with the run (12 blocks of 768 on a caption's 32 tokens);
    the global heads."""
    d, h, w = 1408, 6144, 1024
    stem = 2 * 256 * 3 * 14 * 14 * d
    online = 4 * vit_forward_flops(d, h, 40, 129) + stem
    teacher = vit_forward_flops(d, h, 40, 257) + stem + 2 * 257 * d * w + vit_forward_flops(w, 4 * w, 2, 257)
    decoder = 3 * (2 * 129 * d * w + vit_forward_flops(w, 4 * w, 2, 129) + vit_forward_flops(w, 4 * w, 4, 385)
                   + 2 * 256 * w * w) + 2 * 2 * 256 * w * w
    unigrad = 4 * 2 * 256 * w * w
    view_head = 2 * (d * 4096 + 4096 * 4096 + 4096 * 256)
    heads = 3 * (view_head + 2 * (256 * 4096 + 4096 * 256)) + view_head + 3 * 2 * (d * 768 + 768 * 768)
    text = 3 * vit_forward_flops(768, 4 * 768, 12, 32)
    want = online + teacher + decoder + unigrad + text + heads
    assert billion["flops_per_image"] == pytest.approx(want, rel=0.01)  # norms, softmax, losses left out
    assert billion["parameters"]["backbone"] == 1_011_202_432


@pytest.mark.slow  # the full-size step on fake tensors
def test_the_billion_recipe_fits_80_gib_gpus_at_its_global_batch(billion):
    from m3i.train import memory

    plan = billion["memory"]
    assert plan["rank_batch"] == 512
    own = [r for r in plan["rows"] if r["strategy"] == "hsdp" and r["ckpt"]]
    assert own[0]["fits"] and own[0]["accum_steps"] == 1 and own[0]["total"] < 0.9 * (80 << 30)
    ddp_plain = [r for r in plan["rows"] if r["strategy"] == "ddp" and not r["ckpt"]][0]
    assert not ddp_plain["fits"] and ddp_plain["accum_steps"] > 1  # without checkpointing, in micro-batches
    # on 64 GPUs in 8 nodes a rank holds a smaller batch and an eighth of a node's shards
    acts = plan["activations"]
    with torch.device("meta"):
        params = memory.count_parameters(Objective(load_recipe("m3i-vitg14"), 0))
    wide = memory.plan(params, acts, load_recipe("m3i-vitg14"), 64, 8, 80 << 30)
    assert all(r["fits"] for r in wide["rows"] if r["ckpt"])
