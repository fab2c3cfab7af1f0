"""`m3i pretrain --dry-run`: parameters, FLOPs, images, epochs, steps and the wall time, nothing trained."""
from __future__ import annotations

import json

import pytest
import torch

from m3i.cli import main
from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.train.dryrun import dry_run

# supervised ViT at 32 px: 4 × 4 patches of 8, 2 blocks of 64
SMALL = ["backbone.img_size=32", "data.image_size=32", "backbone.patch_size=8", "backbone.embed_dim=64",
         "backbone.num_heads=2", "backbone.depth=2", "backbone.drop_path_rate=0.0"]


def vit_training_flops(dim: int, depth: int, tokens: int, classes: int) -> float:
    """A ViT's forward FLOPs per image by the usual count (2 per multiply-add): per block the qkv,
    projection and MLP matmuls (24 D² per token) and attention's two (4 N D per token); the patch
    embedding and the linear classifier; the backward pass twice the forward."""
    patches = tokens - 1
    fwd = depth * (24 * dim * dim * tokens + 4 * tokens * tokens * dim) + 2 * patches * 3 * 64 * dim + 2 * dim * classes
    return 3 * fwd


def test_dry_run_counts_a_vit_step_as_the_formula_does():
    recipe = load_recipe("supervised-vitb16", overrides=SMALL)
    info = dry_run(recipe, gpus=8, gpu_check="/nonexistent.json")
    want = vit_training_flops(64, 2, 17, 1000)
    # the formula leaves out norms, softmax and the first layer's missing input gradient: a few per cent
    assert info["flops_per_image"] == pytest.approx(want, rel=0.05)
    assert info["flops_per_step"] == pytest.approx(info["flops_per_image"] * recipe.data.batch_size)
    with torch.device("meta"):
        obj = Objective(recipe, 1000)
    assert info["parameters"]["trainable"] == sum(p.numel() for p in obj.parameters() if p.requires_grad)
    assert info["images_seen"] == recipe.train.steps * recipe.data.batch_size
    # ImageNet is not here: its published size gives the epochs, 300 of them
    assert info["sources"][0]["epochs"] == pytest.approx(300, rel=0.01)
    assert info["estimate"] is None


def test_dry_run_prints_its_figures_and_the_wall_time_from_gpu_check(tmp_path, capsys, monkeypatch):
    check = tmp_path / "gpu.json"
    check.write_text(json.dumps({"environment": {"gpu": "Test GPU"}, "sections": {"vit": {
        "achieved_tflops": 100.0, "img_per_s": 1000.0, "model": "ViT-B/16", "batch": 256, "precision": "bf16"}}}))
    monkeypatch.setenv("M3I_GPU_CHECK", str(check))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert main(["pretrain", "--recipe", "mae-vitb16", "--dry-run", "--gpus", "4", "--out", str(out),
                 *SMALL, "terms.0.decoder.width=64", "terms.0.decoder.heads=2", "terms.0.decoder.depth=1"]) == 0
    text = capsys.readouterr().out
    assert "name: mae-vitb16" in text and "steps:           499200" in text
    recipe = load_recipe("mae-vitb16", overrides=SMALL + ["terms.0.decoder.width=64", "terms.0.decoder.heads=2",
                                                          "terms.0.decoder.depth=1"])
    info = dry_run(recipe, gpus=4, gpu_check=check)
    hours = recipe.train.steps * info["flops_per_step"] / (100e12 * 4) / 3600
    assert info["estimate"]["hours"] == pytest.approx(hours)
    assert f"wall time:       {hours:.0f} h" in text and "4 × Test GPU" in text
    assert not out.exists()  # nothing trained, nothing written
