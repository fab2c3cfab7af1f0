"""ViT-g/14 (``vit_giant``, 1.01 B parameters) in timm's layout: its full-size state dict has the
names and shapes of timm's ``vit_giant_patch14_224`` (checked on the meta device), and a trained
run's ``m3i export`` loads into timm's model of that shape and computes what m3i's backbone does
(at one block, on the CPU). The timm half runs where timm is installed (``.venv-timm``)."""
from __future__ import annotations

import pytest
import torch

from m3i.backbones import build_backbone
from conftest import needs_data
from test_vit import expected_timm_layout

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_full_size_model_has_timms_layout_and_a_billion_parameters():
    with torch.device("meta"):
        model = build_backbone("vit_giant", img_size=224)
    assert (model.embed_dim, model.depth, model.num_heads, model.patch_size) == (1408, 40, 16, 14)
    got = {k: tuple(v.shape) for k, v in model.timm_state_dict().items()}
    assert got == expected_timm_layout(40, 1408, 3, 14, 256, 6144)  # an MLP of 48/11 of the width
    assert sum(model.state_dict()[k].numel() for k in got) == 1_011_202_432


def test_timms_own_model_has_the_same_names_and_shapes():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        theirs = timm.create_model("vit_giant_patch14_224", pretrained=False, num_classes=0)
        ours = build_backbone("vit_giant", img_size=224)
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ours.timm_state_dict().items()}


@needs_data
@pytest.mark.slow
def test_an_export_loads_into_timms_vit_giant(tmp_path):
    timm = pytest.importorskip("timm")
    from m3i.cli import main
    from m3i.runs import load_run

    run, out = tmp_path / "run", tmp_path / "g14.safetensors"
    over = ["backbone.name=vit_giant", "backbone.depth=1", "backbone.img_size=28", "backbone.patch_size=14",
            "data.image_size=28", "data.batch_size=4", "data.num_workers=0", "train.precision=fp32",
            "train.warmup_steps=1"]
    assert main(["pretrain", "--recipe", "supervised", "--out", str(run), "--steps", "1", "--device", "cpu",
                 "--no-progress", *over]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    from safetensors.torch import load_file

    model = timm.create_model("vit_giant_patch14_224", pretrained=False, num_classes=0, depth=1, img_size=28).eval()
    model.load_state_dict(load_file(str(out)), strict=True)
    backbone = load_run(run).backbone.eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   backbone.forward_features(x).pooled)
    folder = tmp_path / "g14"  # and the folder that timm builds the model from by itself
    assert main(["export", "--checkpoint", str(run), "--format", "timm-dir", "--out", str(folder)]) == 0
    again = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.forward_head(again.forward_features(x), pre_logits=True),
                                   backbone.forward_features(x).pooled)
