"""``--init-from`` continues pre-training from a released backbone in timm's layout: a
``.safetensors`` file of timm names or a ``timm-dir`` folder, with the file's classifier left out,
its position table resampled to the recipe's grid, the terms' heads fresh, one line saying so, and
a shape that does not fit named with both shapes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from faults.faultkit import image_folder
from m3i.backbones import build_backbone
from m3i.backbones.vit import resample_pos_embed
from m3i.cli import main
from m3i.runs import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["data.batch_size=4", "data.num_workers=0", "train.warmup_steps=0", "train.steps=1", "train.precision=fp32",
         "train.lr=1e-12", "terms.0.decoder.projector=[32, 16]", "backbone.depth=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    image_folder(root, per_class=4, size=32)
    return f"data.sources=[{{spec: 'folder:{root}'}}]"


def released_vit(grid: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A vit_nano (depth 1) as a release would hold it: timm's names, a classifier, a position table
    for a ``grid`` × ``grid`` patch grid."""
    torch.manual_seed(seed)
    net = build_backbone("vit_nano", depth=1, img_size=4 * grid, patch_size=4)
    for p in net.parameters():
        p.data.normal_()
    weights = {k: v.clone() for k, v in net.timm_state_dict().items()}
    weights["head.weight"], weights["head.bias"] = torch.randn(10, net.embed_dim), torch.randn(10)
    return weights


def pretrain(tmp_path, data, init_from, *extra) -> tuple[int, str]:
    out = tmp_path / "run"
    code = main(["pretrain", "--recipe", "simclr", "--out", str(out), "--init-from", str(init_from), "--no-progress",
                 "backbone.name=vit_nano", "backbone.patch_size=4", *SMALL, data, *extra])
    return code, out


@pytest.mark.parametrize("form", ["file", "timm-dir"])
def test_a_released_vit_is_loaded_with_its_positions_resampled_and_its_classifier_left_out(tmp_path, data, capfd, form):
    weights = released_vit(grid=14)  # trained at 56 px; continued at 32 px: an 8 × 8 grid
    if form == "file":
        src = tmp_path / "vit_nano.safetensors"
    else:
        (tmp_path / "release").mkdir()
        (tmp_path / "release" / "config.json").write_text(json.dumps({"architecture": "vit_nano"}))
        src = tmp_path / "release" / "model.safetensors"
    save_file(weights, str(src))
    code, out = pretrain(tmp_path, data, src if form == "file" else src.parent)
    said = capfd.readouterr().out
    assert code == 0
    loaded = {k.removeprefix("backbone."): v for k, v in ckpt.load_weights(out).items() if k.startswith("backbone.")}
    # lr 1e-12: one step moves nothing at this tolerance, so the run's weights are the file's
    for k, v in weights.items():
        if k.startswith("head."):
            assert k not in loaded
        elif k == "pos_embed":
            want = torch.cat([v[:, :1], resample_pos_embed(v[:, 1:], (14, 14), (8, 8))], 1)
            torch.testing.assert_close(loaded[k], want, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(loaded[k], v, rtol=0, atol=1e-6)
    assert "position table resampled from a 14×14 to a 8×8 patch grid" in said
    line = next(ln for ln in said.splitlines() if "loaded the vit_nano backbone" in ln)
    assert "from weights in timm's layout" in line
    assert "left out the file's classifier (head.bias, head.weight)" in line  # safetensors keeps names sorted
    assert "starting fresh: the heads of the terms view" in line


def test_an_exported_m3i_backbone_continues_in_another_recipe(tmp_path, data, capfd):
    """A run's ``m3i export --format timm`` file is a release like any other."""
    first = tmp_path / "first"
    assert main(["pretrain", "--recipe", "simclr", "--out", str(first), "--no-progress", "backbone.name=vit_nano",
                 "backbone.patch_size=4", *SMALL, data]) == 0
    assert main(["export", "--checkpoint", str(first), "--format", "timm", "--out", str(tmp_path / "b.safetensors")]) == 0
    capfd.readouterr()
    code, out = pretrain(tmp_path, data, tmp_path / "b.safetensors")
    assert code == 0
    exported = load_file(str(tmp_path / "b.safetensors"))
    loaded = ckpt.load_weights(out)
    for k, v in exported.items():
        torch.testing.assert_close(loaded[f"backbone.{k}"], v, rtol=0, atol=1e-6)


def test_a_tensor_of_another_shape_is_named_with_both_shapes(tmp_path, data, capfd):
    weights = released_vit(grid=8)
    weights["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 3)
    save_file(weights, str(tmp_path / "bad.safetensors"))
    code, out = pretrain(tmp_path, data, tmp_path / "bad.safetensors")
    err = capfd.readouterr().err
    assert code == 2
    assert "blocks.0.mlp.fc1.weight: checkpoint (7, 3) vs model (" in err and "Traceback" not in err
    assert f"--init-from {tmp_path / 'bad.safetensors'}" in err
    assert not (out / "checkpoints").exists()


def test_a_file_of_another_architecture_names_what_it_holds_that_the_backbone_lacks(tmp_path, data, capfd):
    weights = released_vit(grid=8)
    weights["blocks.0.ls1.gamma"] = torch.ones(weights["cls_token"].shape[-1])  # layer scale: not in m3i's ViT
    save_file(weights, str(tmp_path / "ls.safetensors"))
    code, _ = pretrain(tmp_path, data, tmp_path / "ls.safetensors")
    err = capfd.readouterr().err
    assert code == 2 and "1 unknown tensors, e.g. ['blocks.0.ls1.gamma']" in err
