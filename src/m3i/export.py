"""Export the pre-trained backbone alone: in timm's state-dict layout (ViT, ConvNeXt, any timm
model), for timm and the detection / segmentation toolkits that load timm weights; or, for every
backbone (the demo's ResNet included), as a program plain PyTorch loads in one line.

Three forms:

* ``timm``: one ``.safetensors`` file of timm-named weights;
* ``timm-dir``: a folder that ``timm.create_model("local-dir:DIR", pretrained=True)`` builds and
  loads with no other code, and that can be uploaded to a model hub as it is::

      DIR/config.json        architecture, model_args, num_features, num_classes=0, pretrained_cfg
                             (mean, std, input_size, interpolation, crop_pct, first_conv, classifier)
      DIR/model.safetensors  the weights (timm names)
      DIR/README.md          a model card

* ``pt2``: one ``torch.export`` program of the backbone with the normalisation baked in, for code
  that has neither m3i nor timm::

      features = torch.export.load("backbone.pt2").module()(images)  # float (B, C, S, S) in [0, 1] -> (B, D)

  the batch size is free; the file's ``m3i.json`` (``torch.export.load(..., extra_files=...)``)
  names the backbone, the image size, mean and std.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .weights import shared_mode

# timm entry points whose defaults the model_args below override (architecture names must exist in timm)
_VIT_ARCH = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
             1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224"}


def writable_file(out: Path, flag: str = "--out") -> None:
    """Raise a one-line ValueError unless a file can be created at ``out`` (checked by writing one)."""
    if out.is_dir():
        raise ValueError(f"{flag} {out}: is a folder; give a file name")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {out}: cannot write into {parent} ({e.strerror or e}); "
                         f"choose a folder you can write to") from None


def _write_failed(out: Path, e: BaseException) -> ValueError:
    return ValueError(f"--out {out}: could not be written ({getattr(e, 'strerror', None) or e}); "
                      f"free some space or choose another folder")


def export_timm(checkpoint: str | Path, out: str | Path) -> Path:
    from .train.runs import load_run

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: expected a .safetensors file name")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a .safetensors file name")
    writable_file(out)  # before any work
    backbone = load_run(checkpoint).backbone
    weights = backbone.timm_state_dict()  # m3i-only tensors (the fill mask token) left out
    tmp = out.with_suffix(".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp),
                  metadata={"format": "pt", "layout": "timm", "architecture": type(backbone).__name__})
        shared_mode(tmp)
        os.replace(tmp, out)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(out, e) from None
    return out


def timm_config(backbone, name: str, mean, std) -> dict:
    """timm's ``config.json`` for ``backbone`` (an m3i ViT or ConvNeXt registered as ``name``)."""
    size = backbone.img_size
    common = {"input_size": [backbone.in_chans, size, size], "mean": list(mean)[:backbone.in_chans],
              "std": list(std)[:backbone.in_chans], "interpolation": "bicubic", "crop_pct": 1.0,
              "num_classes": 0}
    if name.startswith("timm/"):  # timm's own model: rebuilt from its name and the arguments it was made with
        timm_cfg = backbone.model.pretrained_cfg
        args = dict(backbone.create_args)
        arch = backbone.model_name
        cfg = dict(common, first_conv=timm_cfg.get("first_conv", ""), classifier=timm_cfg.get("classifier", ""))
    elif name.startswith("vit"):
        d = backbone.embed_dim
        blk = backbone.blocks[0]
        args = {"img_size": size, "patch_size": backbone.patch_size, "in_chans": backbone.in_chans,
                "embed_dim": d, "depth": len(backbone.blocks), "num_heads": blk.attn.num_heads,
                "mlp_ratio": blk.mlp.fc1.out_features / d, "class_token": True, "global_pool": "token",
                "num_classes": 0}
        arch = _VIT_ARCH.get(d, "vit_base_patch16_224")
        cfg = dict(common, fixed_input_size=True, first_conv="patch_embed.proj", classifier="head")
    elif name.startswith("convnext"):
        args = {"in_chans": backbone.in_chans, "depths": list(backbone.depths), "dims": list(backbone.dims),
                "conv_mlp": backbone.timm_conv_mlp, "patch_size": backbone.stem_stride, "num_classes": 0}
        arch = "convnext_atto" if backbone.timm_conv_mlp else "convnext_tiny"
        cfg = dict(common, first_conv="stem.0", classifier="head.fc")
    else:
        raise ValueError(f"backbone {name!r}: only vit_*, convnext_* and timm/* backbones have a timm layout")
    return {"architecture": arch, "num_classes": 0, "num_features": backbone.embed_dim, "model_args": args,
            "pretrained_cfg": cfg}


_FILES = ("config.json", "model.safetensors", "README.md")
_CARD = """---
library_name: timm
tags:
- image-feature-extraction
- timm
- m3i
---
# {name}

A {name} backbone pre-trained with m3i ({recipe} recipe, {steps} steps, {size}×{size} px), in timm's layout.

```python
import timm

model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)  # or "hf-hub:USER/REPO"
features = model.forward_features(images)  # images normalised with mean {mean}, std {std}
```
"""


def holds_export(out: Path, fmt: str) -> bool:
    """Whether ``out`` holds an earlier export of format ``fmt`` ("timm", "timm-dir" or "pt2")."""
    if fmt != "timm-dir":
        return out.is_file()
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    return bool(names) and names <= set(_FILES)


def export_timm_dir(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out/`` (config.json, model.safetensors, README.md); see the module docstring."""
    from .train.runs import load_run

    out = Path(out)
    if out.suffix == ".safetensors" or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {out}: expected a folder for --format timm-dir")
    if out.is_dir() and not {p.name for p in out.iterdir()} <= set(_FILES):
        raise ValueError(f"--out {out}: the folder holds files other than an export's ({', '.join(_FILES)}); "
                         f"give a new or empty folder")
    writable_file(out / _FILES[0])  # before any work
    objective = load_run(checkpoint)
    recipe, backbone = objective.recipe, objective.backbone
    weights = backbone.timm_state_dict()  # raises, saying why, for backbones without a timm layout
    config = timm_config(backbone, recipe.backbone.name, objective.image_mean, objective.image_std)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt", "m3i_backbone": recipe.backbone.name,
                        "m3i_kwargs": json.dumps(recipe.backbone.kwargs())})
    shared_mode(tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "README.md").write_text(_CARD.format(name=recipe.backbone.name, recipe=recipe.name,
                                                steps=recipe.train.steps, size=backbone.img_size,
                                                mean=config["pretrained_cfg"]["mean"],
                                                std=config["pretrained_cfg"]["std"]))
    if out.exists():  # a previous export (checked above): replaced whole
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


class _Normalized(torch.nn.Module):
    """The backbone on images in [0, 1]: normalised as in training, then pooled features."""

    def __init__(self, backbone, mean, std):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features((images - self.mean) / self.std).pooled


def export_program(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out`` (a ``.pt2`` file): see the module docstring."""
    from .train.runs import load_run

    out = Path(out)
    if out.suffix != ".pt2":
        raise ValueError(f"--out {out}: expected a .pt2 file name for --format pt2")
    writable_file(out)  # before any work
    objective = load_run(checkpoint)
    backbone, size = objective.backbone, objective.backbone.img_size
    module = _Normalized(backbone, objective.image_mean, objective.image_std).eval()
    example = torch.rand(2, backbone.in_chans, size, size)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    meta = {"backbone": objective.recipe.backbone.name, "image_size": size, "in_chans": backbone.in_chans,
            "mean": objective.image_mean, "std": objective.image_std, "embed_dim": backbone.embed_dim,
            "input": "float images in [0, 1], (B, C, S, S)", "output": "pooled features (B, D)"}
    tmp = out.with_suffix(".tmp")
    try:
        torch.export.save(program, str(tmp), extra_files={"m3i.json": json.dumps(meta)})
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(out, e) from None
    return out
