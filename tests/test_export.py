"""`m3i export --format timm-dir`: a folder in timm's local-dir / model-hub layout (config.json +
model.safetensors + a card) whose weights rebuild the run's backbone exactly. (That timm itself
loads it with `timm.create_model("local-dir:DIR", pretrained=True)` is checked by
benchmarks/check_timm.py, in an environment with timm.)"""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from m3i.runs import load_run
from m3i.backbones import build_backbone
from m3i.cli import main
from m3i.config import load_recipe
from m3i.train import loop
from conftest import needs_data

pytestmark = [needs_data, pytest.mark.slow]

SMALL = ["data.batch_size=8", "data.num_workers=0", "train.warmup_steps=1", "train.steps=1",
         "data.sources=[{spec: fashion-mnist}]"]


def export(run, out):
    return main(["export", "--checkpoint", str(run), "--format", "timm-dir", "--out", str(out)])


def test_vit_export_folder_rebuilds_the_backbone(tmp_path):
    loop.pretrain(load_recipe("mae", overrides=SMALL + ["backbone.name=vit_nano", "backbone.depth=2"]),
                  tmp_path / "run", progress=False)
    out = tmp_path / "vit"
    assert export(tmp_path / "run", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_base_patch16_224"  # vit_nano's width (128) has no timm name of its own
    assert cfg["num_features"] == 128 and cfg["num_classes"] == 0
    args = cfg["model_args"]
    assert args == {"img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 128, "depth": 2, "num_heads": 4,
                    "mlp_ratio": 4.0, "class_token": True, "global_pool": "token", "num_classes": 0}
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["mean"] == [0.5] * 3 and pc["std"] == [0.5] * 3
    assert pc["first_conv"] == "patch_embed.proj" and pc["classifier"] == "head"

    # the architecture the config describes, with the folder's weights, is the run's backbone
    rebuilt = build_backbone("vit_nano", **{k: args[k] for k in ("img_size", "patch_size", "embed_dim", "depth",
                                                                  "num_heads", "mlp_ratio")})
    weights = load_file(str(out / "model.safetensors"))
    assert "mask_token" not in weights
    rebuilt.load_state_dict(weights, strict=True)
    trained = load_run(tmp_path / "run").backbone
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().forward_features(x).pooled, trained.forward_features(x).pooled)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["m3i_backbone"] == "vit_nano"
    assert "local-dir:" in (out / "README.md").read_text()

    # a second export into the folder is refused; with --overwrite the first is moved aside, whole
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert export(tmp_path / "run", out) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "timm-dir", "--out", str(out),
                 "--overwrite"]) == 0
    aside = list(tmp_path.glob("vit.old-*"))
    assert len(aside) == 1 and {p.name: p.read_bytes() for p in aside[0].iterdir()} == first
    assert sorted(p.name for p in out.iterdir()) == sorted(first)


def test_convnext_export_folder_has_timm_conv_mlp_kernels(tmp_path):
    captioned = "data.sources=[{spec: fashion-mnist}, {spec: 'emoji:train', labels: false}]"  # every term has data
    loop.pretrain(load_recipe("m3i", overrides=SMALL + [captioned, "backbone.name=convnext_atto", "backbone.patch_size=8",
                                                        "terms.2.target_encoder.tower=scratch"]),
                  tmp_path / "run", progress=False)
    out = tmp_path / "cnx"
    assert export(tmp_path / "run", out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "convnext_atto" and cfg["num_features"] == 320
    assert cfg["model_args"] == {"in_chans": 3, "depths": [2, 2, 6, 2], "dims": [40, 80, 160, 320],
                                 "conv_mlp": True, "patch_size": 1, "num_classes": 0}
    w = load_file(str(out / "model.safetensors"))
    assert w["stages.0.blocks.0.mlp.fc1.weight"].shape == (160, 40, 1, 1)
    rebuilt = build_backbone("convnext_atto", img_size=32, stem_stride=1)
    rebuilt.load_timm_state_dict(w, strict=True)
    trained = load_run(tmp_path / "run").backbone
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().forward_features(x).pooled, trained.forward_features(x).pooled)


def test_timm_dir_errors_are_one_clear_line(tmp_path, capsys):
    loop.pretrain(load_recipe("sim", overrides=SMALL + ["backbone.name=resnet_nano", "views.input_mode=fill"]),
                  tmp_path / "res", progress=False)
    assert export(tmp_path / "res", tmp_path / "out") == 2
    assert "no timm layout" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert export(tmp_path / "res", busy) == 2
    assert "holds files other than an export's" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "keep me"


def test_the_demo_backbone_exports_a_program_plain_pytorch_loads_in_one_line(tmp_path):
    """resnet_nano has no timm layout; ``--format pt2`` gives it an export that needs neither m3i nor
    timm: ``torch.export.load(FILE).module()`` takes images in [0, 1] at any batch size and gives the
    run's features (the backbone on the images normalised as in training)."""
    loop.pretrain(load_recipe("m3i", overrides=SMALL + ["data.sources=[{spec: fashion-mnist}, {spec: emoji}]",
                                                        "terms.2.target_encoder.tower=scratch",
                                                        "terms.2.target_encoder.width=16",
                                                        "terms.2.target_encoder.depth=1"]),
                  tmp_path / "run", progress=False)
    out = tmp_path / "backbone.pt2"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "pt2", "--out", str(out)]) == 0
    module = torch.export.load(str(out)).module()
    objective = load_run(tmp_path / "run")
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(module(images.float() / 255), objective.encode_image(images), rtol=1e-4, atol=1e-5)
    assert module(torch.rand(5, 3, 32, 32)).shape == (5, objective.backbone.embed_dim)
    extra = {"m3i.json": ""}
    torch.export.load(str(out), extra_files=extra)
    meta = json.loads(extra["m3i.json"])
    assert meta["backbone"] == "resnet_nano" and meta["image_size"] == 32 and meta["mean"] == objective.image_mean
