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


def test_dry_run_with_accumulation_counts_its_pass_without_gradient():
    # exact accumulation runs the batch once more forward, without gradient: a third of the step more
    recipe = load_recipe("supervised-vitb16", overrides=SMALL + ["train.accum_steps=2"])
    info = dry_run(recipe, gpus=8, gpu_check="/nonexistent.json")
    assert info["flops_per_image"] == pytest.approx(vit_training_flops(64, 2, 17, 1000) * 4 / 3, rel=0.05)


def gpu_check(folder, flops_per_image: float, tflops: float = 100.0):
    """A gpu_check.py result: ``tflops`` achieved on a step of ``flops_per_image``."""
    path = folder / "gpu.json"
    path.write_text(json.dumps({"environment": {"gpu": "Test GPU"}, "sections": {"vit": {
        "achieved_tflops": tflops, "img_per_s": tflops * 1e12 / flops_per_image, "model": "ViT-B/16", "batch": 256,
        "precision": "bf16"}}}))
    return path


def test_dry_run_prints_its_figures_and_the_wall_time_from_gpu_check(tmp_path, capsys, monkeypatch):
    # a measured step no larger than this small ViT's, at 0.1 TFLOP/s: hours, not minutes
    check = gpu_check(tmp_path, flops_per_image=1e3, tflops=0.1)
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
    hours = recipe.train.steps * info["flops_per_step"] / (0.1e12 * 4) / 3600
    assert info["estimate"]["hours"] == pytest.approx(hours) and hours > 1
    assert f"wall time:       {hours:.0f} h" in text and "4 × Test GPU" in text
    assert not out.exists()  # nothing trained, nothing written


def resnet_forward(size: int, stem: int = 2, dims=(32, 64, 128)) -> tuple[int, int]:
    """A ResNet's forward FLOPs per image at ``size`` px (2 per multiply-add of its convolutions:
    the (2·stem+1)² stem of stride ``stem``, per stage a 3×3 stride-2 conv in front of all but the
    first and one basic block of two 3×3 convs), and its stem's share (resnet_nano by default)."""
    side, k = size // stem, 2 * stem + 1
    stem_fwd = 2 * side * side * dims[0] * 3 * k * k
    fwd, cin = stem_fwd, dims[0]
    for i, d in enumerate(dims):
        if i:
            side //= 2
            fwd += 2 * side * side * d * cin * 9
        fwd += 2 * (2 * side * side * d * d * 9)
        cin = d
    return fwd, stem_fwd


def resnet_training_flops(size: int, stem: int, dims: tuple[int, ...], classes: int) -> float:
    """:func:`resnet_forward` and the linear classifier; the backward pass is twice the forward,
    less the stem's input gradient (the image needs none)."""
    fwd, stem_fwd = resnet_forward(size, stem, dims)
    fwd += 2 * dims[-1] * classes
    return 3 * fwd - stem_fwd


def test_a_resnet_step_counts_as_the_formula_does():
    from m3i.train.dryrun import step_flops

    recipe = load_recipe("supervised", overrides=["backbone.name=resnet_nano", "backbone.patch_size=8"])
    assert recipe.data.image_size == 32
    per_image = step_flops(recipe, 10, batch=4) / 4
    # the formula leaves out batch norm, ReLU, pooling and the loss: well under 5 per cent
    assert per_image == pytest.approx(resnet_training_flops(32, 2, (32, 64, 128), 10), rel=0.05)


def test_a_step_counts_a_frozen_text_towers_cached_embeddings_not_the_tower():
    """A frozen tower embeds the captions once before training; the step looks them up: its
    FLOPs are the backbone's and the projections', as in a run."""
    from m3i.train.dryrun import step_flops

    ov = ["backbone.name=resnet_nano", "backbone.patch_size=8"]
    clip, sup = load_recipe("clip", overrides=ov), load_recipe("supervised", overrides=ov)
    # the same backbone; CLIP adds a projection to 128, the caption's projection from the tower's
    # 384 and the B × B logits, where the supervised step has its 10-class table
    extra = 2 * 128 * 128 + 2 * 384 * 128 + 2 * 2 * 128 * 4 - 2 * 128 * 10
    want = resnet_training_flops(32, 2, (32, 64, 128), 10) + 3 * extra
    assert step_flops(clip, 0, batch=4) / 4 == pytest.approx(want, rel=0.05)  # the tower alone would be ~150 M
    assert step_flops(sup, 10, batch=4) / 4 < want


def printed(capsys, key: str) -> str:
    """The value of ``key:`` in what the dry run printed."""
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(key + ":")]
    return line.split(":", 1)[1].strip()


def test_a_trained_text_towers_step_counts_every_token_a_caption_keeps(capsys):
    """CLIP's text tower trains with the run: its step costs its blocks at the tower's full 32
    tokens (a batch pads to its longest caption, which at scale reaches the cut), not at the
    length of a few short synthetic captions."""
    w, depth, tokens = 256, 4, 32
    ov = ["backbone.name=resnet_nano", "backbone.patch_size=8", "terms.0.target_encoder.tower=scratch",
          f"terms.0.target_encoder.width={w}", f"terms.0.target_encoder.depth={depth}", "terms.0.target_encoder.heads=4"]
    assert main(["pretrain", "--recipe", "clip", "--dry-run", *ov]) == 0
    value, unit = printed(capsys, "FLOPs per image").split()[:2]
    counted = float(value) * {"MFLOP": 1e6, "GFLOP": 1e9}[unit]
    # by hand: the ResNet without its class table; per caption, each block's matmuls (24 w² a token)
    # and attention (4 L w a token), forward and backward; CLIP's projection to 128 of the image
    # and of the caption, and the B × B logits
    backbone = resnet_training_flops(32, 2, (32, 64, 128), 10) - 3 * 2 * 128 * 10
    text = 3 * depth * (24 * w * w * tokens + 4 * tokens * tokens * w)
    heads = 3 * (2 * 128 * 128 + 2 * w * 128 + 2 * 2 * 128 * 4)
    assert text > 5 * backbone  # the tower dominates: a count at a few tokens a caption would be far off
    assert counted == pytest.approx(backbone + text + heads, rel=0.05)


def test_a_cpu_recipes_dry_run_tells_how_to_time_it(tmp_path, capsys, monkeypatch):
    """No wall time from a throughput measured on a far larger step, and no file that a pip install
    lacks named as if it were there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ov = ["backbone.name=resnet_nano", "backbone.patch_size=8"]
    monkeypatch.setenv("M3I_GPU_CHECK", str(tmp_path / "absent.json"))
    assert main(["pretrain", "--recipe", "supervised", "--dry-run", *ov]) == 0
    assert printed(capsys, "wall time") == (
        "not estimated: no measured throughput for this machine (cpu); time a few steps of the run itself (the same "
        "command without --dry-run, with --steps 20, prints img/s), or, for GPUs, point $M3I_GPU_CHECK at the "
        "results/gpu.json that benchmarks/gpu_check.py of m3i's source repository writes")
    monkeypatch.setenv("M3I_GPU_CHECK", str(gpu_check(tmp_path, flops_per_image=90e9)))  # a ViT-B/16 step's
    assert main(["pretrain", "--recipe", "supervised", "--dry-run", *ov]) == 0
    said = printed(capsys, "wall time")
    assert said.startswith("not estimated: a step of this recipe (") and "90.00 GFLOP per image" in said
    assert said.endswith("time a few steps of the run itself (the same command without --dry-run, with --steps 20, "
                         "prints img/s)")


def test_a_wall_time_under_an_hour_is_given_in_minutes_or_seconds(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ov = SMALL + ["train.steps=2"]
    per_step = dry_run(load_recipe("supervised-vitb16", overrides=ov), gpu_check=tmp_path / "absent.json")["flops_per_step"]
    for seconds, said in ((30, "30 s"), (300, "5 min")):
        # a throughput at which the run's 2 steps take ``seconds`` on one GPU
        check = gpu_check(tmp_path, flops_per_image=1e3, tflops=2 * per_step / seconds / 1e12)
        monkeypatch.setenv("M3I_GPU_CHECK", str(check))
        assert main(["pretrain", "--recipe", "supervised-vitb16", "--dry-run", "--gpus", "1", *ov]) == 0
        assert printed(capsys, "wall time").startswith(f"{said} on 1 × Test GPU at ")
