"""Any timm model as the backbone, at reduced sizes on the CPU, over three families: a ViT (token
dropping and the mask token), ConvNeXt V2 (the mask token after the stem) and EfficientNet (plain
views). Each trains a few steps through ``m3i pretrain``, is evaluated, and exports weights that
``timm.create_model`` loads into the same model. Then a sweep over the smallest model of each
family a user reaches for, at its own size: each trains a step in every input mode it takes and
exports a folder timm loads. Needs timm (``m3i[timm]``), which needs torchvision; ``make test``
runs this file in the environment that has them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

timm = pytest.importorskip("timm")

from m3i.backbones import build_backbone  # noqa: E402
from m3i.cli import main  # noqa: E402
from m3i.config import ConfigError, load_recipe  # noqa: E402
from m3i.runs import load_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = ("vit_small_patch16_224", {"embed_dim": 32, "depth": 2, "num_heads": 2}, 32, 8)
CONVNEXT = ("convnextv2_atto", {"dims": [8, 16, 16, 32], "depths": [1, 1, 1, 1]}, 64, None)
EFFNET = ("efficientnet_b0", {}, 32, None)


def make(spec, fill=False):
    name, args, size, patch = spec
    torch.manual_seed(0)
    kw = {"img_size": size, **args, **({"patch_size": patch} if patch else {})}
    return build_backbone(f"timm/{name}", fill=fill, **kw).eval()


def test_input_modes_by_family_and_a_one_line_refusal():
    assert make(VIT).input_modes == ("drop", "fill")
    assert make(CONVNEXT).input_modes == ("fill",)
    assert make(EFFNET).input_modes == ()
    with pytest.raises(ConfigError) as e:
        load_recipe("mae", overrides=["backbone.name=timm/efficientnet_b0"])
    assert "views.input_mode: timm/efficientnet_b0 takes no masked views" in str(e.value)
    with pytest.raises(ConfigError, match="views.input_mode: timm/convnextv2_atto takes masked views as 'fill', not 'drop'"):
        load_recipe("mae", overrides=["backbone.name=timm/convnextv2_atto"])
    with pytest.raises(ConfigError, match="timm has no model 'vit_gigantic_zz'"):
        load_recipe("mae", overrides=["backbone.name=timm/vit_gigantic_zz"])


@pytest.mark.parametrize("spec", [VIT, CONVNEXT, EFFNET], ids=["vit", "convnextv2", "efficientnet"])
def test_unmasked_features_are_timms_own(spec):
    """With nothing masked, the features are the timm model's: forward_features, then the head's
    pooling (pre_logits)."""
    net = make(spec)
    x = torch.randn(2, 3, spec[2], spec[2])
    out = net.forward_features(x)
    with torch.no_grad():
        fm = net.model.forward_features(x)
        pooled = net.model.forward_head(fm, pre_logits=True)
    torch.testing.assert_close(out.pooled, pooled)
    assert out.tokens.shape == (2, net.num_patches, net.embed_dim)


@pytest.mark.parametrize("spec, mode", [(VIT, "drop"), (VIT, "fill"), (CONVNEXT, "fill")],
                         ids=["vit-drop", "vit-fill", "convnextv2-fill"])
def test_masked_patches_do_not_reach_the_features(spec, mode):
    """Whatever the pixels of the masked patches hold, the features do not change (dropped, or
    replaced by the mask token); the visible patches do change them."""
    net = make(spec, fill=True)
    size, n = spec[2], net.num_patches
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g)
    visible = torch.zeros(2, n, dtype=torch.bool)
    visible[:, : n // 2] = True
    p, gw = net.patch_size, net.grid_size[1]
    y = x.clone()
    for i in range(n // 2, n):  # new pixels in every masked patch
        r, c = divmod(i, gw)
        y[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = torch.randn(2, 3, p, p, generator=g)
    with torch.no_grad():
        a, b = net.forward_features(x, visible, mode=mode), net.forward_features(y, visible, mode=mode)
        c = net.forward_features(x + 1.0, visible, mode=mode)
    torch.testing.assert_close(a.tokens, b.tokens)
    torch.testing.assert_close(a.pooled, b.pooled)
    assert a.tokens.shape == (2, n // 2, net.embed_dim)
    assert not torch.allclose(a.pooled, c.pooled)


def folder(root: Path, size: int) -> Path:
    g = np.random.default_rng(0)
    for c in "ab":
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "m3i.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, check=False)


@pytest.mark.parametrize("spec, recipe, mode", [(VIT, "sim", "drop"), (CONVNEXT, "mae", "fill"), (EFFNET, "simclr", None)],
                         ids=["vit-sim", "convnextv2-mae", "efficientnet-simclr"])
@pytest.mark.slow
def test_trains_evaluates_and_exports_the_same_timm_model(tmp_path, spec, recipe, mode):
    name, args, size, patch = spec
    data = folder(tmp_path / "data", size)
    over = [f"backbone.name=timm/{name}", f"backbone.img_size={size}", f"data.image_size={size}",
            f"data.sources=[{{spec: 'folder:{data}'}}]", "data.batch_size=8", "data.num_workers=0",
            "train.precision=fp32", "train.log_every=1", "train.warmup_steps=1"]
    over += [f"backbone.{k}={json.dumps(v)}" for k, v in args.items()]
    over += [f"backbone.patch_size={patch}" if patch else "backbone.patch_size=null"]
    over += [f"views.input_mode={mode}"] if mode else []
    if recipe in ("sim", "mae"):
        over += ["terms.0.decoder.width=16", "terms.0.decoder.heads=2", "terms.0.decoder.depth=1"]
    run = tmp_path / "run"
    proc = cli(["pretrain", "--recipe", recipe, "--out", str(run), "--steps", "2", "--device", "cpu", "--no-progress",
                *over], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2] and all(np.isfinite(m["loss"]) for m in logged)
    proc = cli(["eval", "--checkpoint", str(run), "--task", "knn", "--dataset", f"folder:{data}", "--no-progress",
                "--device", "cpu", "--json", str(tmp_path / "knn.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 0.0 <= json.loads((tmp_path / "knn.json").read_text())["metrics"]["top1"] <= 1.0
    out = tmp_path / "export"
    proc = cli(["export", "--checkpoint", str(run), "--format", "timm-dir", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # timm alone builds the model from the folder and loads the weights; it computes what m3i's backbone does
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    from m3i.runs import load_run

    backbone = load_run(run).backbone
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   backbone.forward_features(x).pooled)
    assert yaml.safe_load((run / "config.yaml").read_text())["backbone"]["name"] == f"timm/{name}"


# the smallest model of each family a user reaches for: (model, image size, the masked input modes it
# takes, the names of its stem's parameters: timm's first conv and the norm right after it)
SWEEP = {
    "resnet": ("resnet18", 32, (), ("conv1.", "bn1.")),
    "resnet-d": ("resnet10t", 32, (), ("conv1.", "bn1.")),  # a deep (three-conv) stem, average-pool shortcuts
    "regnet": ("regnetx_002", 32, (), ("stem.",)),
    "efficientnet": ("efficientnet_b0", 32, (), ("conv_stem.", "bn1.")),
    "mobilenetv3": ("mobilenetv3_small_050", 32, (), ("conv_stem.", "bn1.")),  # pooled wider than the map
    "convnext": ("convnext_atto", 64, ("fill",), ("stem.",)),  # 64 px: a 2×2 grid, so a mask hides some of it
    "vit": ("vit_tiny_patch16_224", 32, ("drop", "fill"), ("patch_embed.",)),
    "deit": ("deit_tiny_distilled_patch16_224", 32, ("drop", "fill"), ("patch_embed.",)),  # two prefix tokens
    "swin": ("swin_tiny_patch4_window7_224", 32, (), ("patch_embed.",)),  # built for one size: img_size given
    "eva": ("eva02_tiny_patch14_224", 32, (), ("patch_embed.",)),
    # models that do not take a setting m3i has a default for: patch_size (CoAtNet, a Mixer), drop_path_rate
    # (EfficientViT); and tokens with no patch_embed to read the grid from (a Mixer, LeViT)
    "coatnet": ("coatnet_nano_rw_224", 32, (), ("stem.",)),
    "mixer": ("mixer_s16_224", 32, (), ("stem.",)),
    "efficientvit": ("efficientvit_b0", 32, (), ("stem.",)),
    "levit": ("levit_128s", 32, (), ("stem.",)),
}
PLAIN_ONLY = [f for f, (_, _, modes, _) in SWEEP.items() if not modes]


@pytest.mark.parametrize("family", SWEEP)
def test_every_family_builds_freezes_its_stem_and_gives_features_of_one_width(family):
    """Built as a recipe builds it (patch_size 4 from the defaults, for the models built for one
    size): the modes it takes, only the stem frozen by frozen_patch_embed, and pooled features of
    timm's own pre-logits width, with tokens of that width over the grid."""
    name, size, modes, stem = SWEEP[family]
    net = build_backbone(f"timm/{name}", img_size=size, patch_size=4, frozen_patch_embed=True).eval()
    assert net.input_modes == modes
    frozen = {n.removeprefix("model.") for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {n.removeprefix("model.") for n, _ in net.named_parameters()
                                 if n.removeprefix("model.").startswith(stem)}
    assert all(net.layer_id(f"model.{n}") == 0 for n in frozen)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = net.forward_features(x)
        width = net.model.forward_head(net.model.forward_features(x), pre_logits=True).shape[-1]
    assert net.embed_dim == width and out.pooled.shape == (2, width)
    assert out.tokens.shape == (2, net.num_patches, width)


@pytest.mark.parametrize("family", PLAIN_ONLY)
def test_a_model_that_takes_no_masked_views_is_refused_naming_the_mode_and_the_model(tmp_path, capsys, family):
    name = SWEEP[family][0]
    code = main(["pretrain", "--recipe", "mae", "--out", str(tmp_path / "run"), f"backbone.name=timm/{name}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"timm/{name} takes no masked views" in err and "not 'drop'" in err and "frozen_patch_embed" not in err
    assert not (tmp_path / "run").exists()


def sweep_runs():
    for family, (_, _, modes, _) in SWEEP.items():
        for mode in ("plain", *modes):
            yield pytest.param(family, mode, id=f"{family}-{mode}")


@pytest.mark.slow
@pytest.mark.parametrize("family, mode", list(sweep_runs()))
def test_every_family_trains_a_step_in_each_mode_it_takes_and_exports_a_folder_timm_loads(tmp_path, capsys, family, mode):
    name, size, _, _ = SWEEP[family]
    data = folder(tmp_path / "data", size)
    over = [f"backbone.name=timm/{name}", f"data.image_size={size}", f"data.sources=[{{spec: 'folder:{data}'}}]",
            "data.batch_size=4", "data.num_workers=0", "train.precision=fp32", "train.log_every=1", "train.warmup_steps=1"]
    if mode == "plain":  # SimCLR: two plain views
        recipe, over = "simclr", over + ["terms.0.decoder.projector=[32, 16]"]
    else:  # MAE: the masked view as ``mode`` takes it
        recipe = "mae"
        over += [f"views.input_mode={mode}", "terms.0.decoder.width=16", "terms.0.decoder.heads=2", "terms.0.decoder.depth=1"]
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["pretrain", "--recipe", recipe, "--out", str(run), "--steps", "1", "--device", "cpu", "--no-progress",
                 *over]) == 0, capsys.readouterr().err[-3000:]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1] and np.isfinite(logged[0]["loss"])
    assert main(["export", "--checkpoint", str(run), "--format", "timm-dir", "--out", str(out)]) == 0, capsys.readouterr().err
    # timm alone builds the model from the folder and loads the weights: it computes the run's features
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   load_run(run).backbone.forward_features(x).pooled)


@pytest.mark.parametrize("timm_name, ours, size, patch", [
    ("vit_tiny_patch16_224", "vit_tiny", 32, 16),    # released at 224 (14 × 14 patches), continued at 32 (2 × 2)
    ("convnext_atto", "convnext_atto", 32, 32),      # timm keeps its MLP as 1×1 convolutions; stem 4 × 8 = 32
    ("vit_tiny_patch16_224", "timm/vit_tiny_patch16_224", 32, 16),
], ids=["m3i-vit", "m3i-convnext", "timm-vit"])
def test_a_released_timm_model_continues_pre_training_from_its_file(tmp_path, capsys, timm_name, ours, size, patch):
    """``--init-from`` a timm model's own weights file (classifier and all): after the run, the
    backbone holds timm's features of the same images (lr 1e-12: one step moves nothing)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    released = timm.create_model(timm_name, pretrained=False).eval()
    save_file({k: v.contiguous() for k, v in released.state_dict().items()}, str(tmp_path / "released.safetensors"))
    data = folder(tmp_path / "data", size)
    out = tmp_path / "run"
    args = ["pretrain", "--recipe", "simclr", "--out", str(out), "--init-from", str(tmp_path / "released.safetensors"),
            "--no-progress", f"backbone.name={ours}", f"backbone.img_size={size}", "data.batch_size=4",
            "data.num_workers=0", "train.steps=1", "train.warmup_steps=0", "train.lr=1e-12", "train.precision=fp32",
            f"data.sources=[{{spec: 'folder:{data}'}}]", *([f"backbone.patch_size={patch}"] if patch else [])]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "left out the file's classifier (head" in said and "from weights in timm's layout" in said
    run = load_run(out)
    x = torch.randn(2, 3, size, size)
    ours_net = run.backbone.eval()
    theirs = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=size).eval() if "vit" in timm_name \
        else timm.create_model(timm_name, pretrained=False, num_classes=0).eval()
    state = {k: v for k, v in released.state_dict().items() if not k.startswith("head.fc") and k != "head.weight"
             and k != "head.bias"}
    if "vit" in timm_name:  # timm's own resampling of the table to the 2 × 2 grid, as ours does it
        from timm.layers import resample_abs_pos_embed
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (size // 16, size // 16), num_prefix_tokens=1)
    theirs.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(ours_net.forward_features(x).pooled, theirs(x), rtol=1e-4, atol=1e-4)
