"""Load `m3i export` results into timm itself and compare the outputs.

Needs an environment with timm (timm needs torchvision; on the CPU machines here that is
`pip install torch==2.14.1 torchvision==0.29.1 timm safetensors` in a separate venv):

    m3i export --checkpoint RUN --out vit.safetensors
    PYTHONPATH=src python benchmarks/check_timm.py vit vit.safetensors --img 32 --patch 4 --dim 192 --depth 6 --heads 3
    PYTHONPATH=src python benchmarks/check_timm.py convnext cnx.safetensors --img 32 --stem 1

A `--format timm-dir` folder is built and loaded by timm alone, from its config.json:

    m3i export --checkpoint RUN --format timm-dir --out DIR
    PYTHONPATH=src python benchmarks/check_timm.py dir DIR

which prints what `timm.create_model("local-dir:DIR", pretrained=True)` built, the data config timm
resolves from the folder, and the largest difference between timm's pooled features and those of
m3i's backbone holding the same weights.
"""
import json
from pathlib import Path

import argparse

import timm
import timm.models.convnext as tc
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common import timm_vit
from m3i.backbones import build_backbone


def check_dir(folder: str) -> float:
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    cfg = json.loads((Path(folder) / "config.json").read_text())
    data = timm.data.resolve_data_config({}, model=model)
    print(f"timm.create_model('local-dir:{folder}', pretrained=True) -> {type(model).__name__} "
          f"({cfg['architecture']} with {cfg['model_args']}), num_features {model.num_features}")
    print("timm data config:", data)
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    w = load_file(str(Path(folder) / "model.safetensors"))
    mine = build_backbone(meta["m3i_backbone"], **json.loads(meta["m3i_kwargs"])).eval()
    if hasattr(mine, "load_timm_state_dict"):
        mine.load_timm_state_dict(w, strict=True)
    else:
        mine.load_state_dict(w, strict=True)
    x = torch.randn(2, *data["input_size"])
    with torch.no_grad():
        t = model.forward_head(model.forward_features(x), pre_logits=True)
        diff = (mine.forward_features(x).pooled - t).abs().max().item()
    assert model.num_features == cfg["num_features"] and list(data["input_size"]) == cfg["pretrained_cfg"]["input_size"]
    print("max |m3i pooled - timm pre-logits|:", diff)
    return diff


def main():
    p = argparse.ArgumentParser()
    p.add_argument("family", choices=["vit", "convnext", "dir"])
    p.add_argument("file")
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--stem", type=int, default=4)
    a = p.parse_args()
    if a.family == "dir":
        diff = check_dir(a.file)
        raise SystemExit(0 if diff < 1e-4 else 1)
    w = load_file(a.file)
    x = torch.randn(2, 3, a.img, a.img)
    if a.family == "vit":
        ref = timm_vit(a.img, a.patch, a.dim, a.depth, a.heads)
        mine = build_backbone("vit_micro", img_size=a.img, patch_size=a.patch, embed_dim=a.dim, depth=a.depth,
                              num_heads=a.heads)
    else:
        ref = tc.ConvNeXt(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True, num_classes=0,
                          patch_size=a.stem)
        mine = build_backbone("convnext_atto", img_size=a.img, stem_stride=a.stem)
    print("timm load_state_dict(strict=True):", ref.load_state_dict(w, strict=True))
    mine.load_state_dict({k: v.reshape(mine.state_dict()[k].shape) for k, v in w.items()}, strict=False)
    ref.eval(), mine.eval()
    with torch.no_grad():
        f = mine.forward_features(x)
        if a.family == "vit":
            t = ref.forward_features(x)
            print("max |pooled - timm cls|:", (f.pooled - t[:, 0]).abs().max().item())
            print("max |tokens - timm tokens|:", (f.tokens - t[:, 1:]).abs().max().item())
        else:
            t = ref.forward_head(ref.forward_features(x), pre_logits=True)
            print("max |pooled - timm pre-logits|:", (f.pooled - t).abs().max().item())


if __name__ == "__main__":
    main()
