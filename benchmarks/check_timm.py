"""Load `m3i export --format timm` files into timm itself and compare the outputs.

Needs an environment with timm (timm needs torchvision; on the CPU machines here that is
`pip install torch==2.14.1 torchvision==0.29.1 timm safetensors` in a separate venv):

    m3i export --checkpoint RUN --out vit.safetensors
    PYTHONPATH=src python benchmarks/check_timm.py vit vit.safetensors --img 32 --patch 4 --dim 192 --depth 6 --heads 3
    PYTHONPATH=src python benchmarks/check_timm.py convnext cnx.safetensors --img 32 --stem 1
"""
import argparse

import timm.models.convnext as tc
import timm.models.vision_transformer as tv
import torch
from safetensors.torch import load_file

from m3i.backbones import build_backbone


def main():
    p = argparse.ArgumentParser()
    p.add_argument("family", choices=["vit", "convnext"])
    p.add_argument("file")
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--stem", type=int, default=4)
    a = p.parse_args()
    w = load_file(a.file)
    x = torch.randn(2, 3, a.img, a.img)
    if a.family == "vit":
        ref = tv.VisionTransformer(img_size=a.img, patch_size=a.patch, embed_dim=a.dim, depth=a.depth,
                                   num_heads=a.heads, num_classes=0)
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
