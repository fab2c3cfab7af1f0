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
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .runs.exports import DIR_FILES, FORMATS, SUFFIX, holds_export
from .weights import shared_mode

# timm entry points whose defaults the model_args below override (architecture names must exist in timm)
_VIT_ARCH = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
             1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224", 1408: "vit_giant_patch14_224"}


def _probe(out: Path, folder: Path, flag: str) -> None:
    """Raise a one-line ValueError unless a new file can be made in ``folder`` (checked by making one)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {out}: cannot write into {folder} ({e.strerror or e}); "
                         f"choose a folder you can write to") from None


def writable_file(out: Path, flag: str = "--out") -> None:
    """Raise a one-line ValueError unless a file can be created at ``out`` (its folder is made)."""
    if out.is_dir():
        raise ValueError(f"{flag} {out}: is a folder; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {out}: cannot write into {out.parent} ({e.strerror or e}); "
                         f"choose a folder you can write to") from None
    _probe(out, out.parent, flag)


def _writable(out: Path) -> None:
    """Like :func:`writable_file`, but nothing is made: the nearest folder that exists is probed
    (the folders up to ``out`` are made only when the export is written)."""
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    _probe(out, folder, "--out")


def _write_failed(out: Path, e: BaseException) -> ValueError:
    return ValueError(f"--out {out}: could not be written ({getattr(e, 'strerror', None) or e}); "
                      f"free some space or choose another folder")


@contextmanager
def _staged(out: Path):
    """The path to write the export to: in a new hidden folder beside ``out``, renamed to ``out``
    once written (a whole export or none). On any failure the folder goes, with the folders made
    for it."""
    made = [p for p in out.parents if not p.exists()]  # the deepest first
    stage = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
        yield stage / out.name  # the name of ``out`` itself: torch.export wants a .pt2 archive name
        os.replace(stage / out.name, out)
        stage.rmdir()
    except BaseException as e:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for folder in made:
            with suppress(OSError):
                folder.rmdir()
        if isinstance(e, (OSError, SafetensorError)):
            raise _write_failed(out, e) from None
        raise


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


_CARD = """---
library_name: timm
tags:
- image-feature-extraction
- timm
- m3i
---
# {name}

A {name} backbone pre-trained with m3i ({recipe} recipe, {steps}, {size}×{size} px), in timm's layout.

```python
import timm

model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)  # or "hf-hub:USER/REPO"
features = model.forward_features(images)  # images normalised with mean {mean}, std {std}
```
"""


# the modules of m3i.backbones whose weights have timm's names (m3i's ViT and ConvNeXt, timm's own models)
_TIMM_LAYOUT = tuple(f"{__package__}.backbones.{m}" for m in ("vit", "convnext", "timm"))
def _check_out(out: Path, fmt: str) -> None:
    """The refusals of ``--out`` itself: the wrong kind of name, or something there that is not an
    earlier export of this format (only those are ever moved aside)."""
    if fmt == "timm-dir":
        if out.suffix in SUFFIX.values() or (out.exists() and not out.is_dir()):
            raise ValueError(f"--out {out}: expected a folder for --format timm-dir")
        if out.is_dir() and any(out.iterdir()) and not holds_export(out, fmt):
            raise ValueError(f"--out {out}: the folder holds files other than an export's ({', '.join(DIR_FILES)}); "
                             f"give a new or empty folder")
        return
    suffix = SUFFIX[fmt]
    if out.suffix != suffix:
        raise ValueError(f"--out {out}: expected a {suffix} file name for --format {fmt}")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a {suffix} file name")
    if out.exists() and not holds_export(out, fmt):
        raise ValueError(f"--out {out}: holds a file that is not an m3i export; choose another --out")


def _check_not_in_checkpoints(source: Path, out: Path) -> None:
    from .runs import same_or_inside

    keep = source.parent if source.parent.name == "checkpoints" else source
    if same_or_inside(out, keep):
        raise ValueError(f"--out {out}: inside {keep}, where the run keeps its checkpoints; choose another --out")


def _check_layout(backbone: str, fmt: str, checkpoint, out: Path) -> None:
    from .backbones.registry import module_of

    if fmt != "pt2" and module_of(backbone) not in _TIMM_LAYOUT:
        raise ValueError(f"--format {fmt}: backbone {backbone} has no timm layout (only vit_*, convnext_* and "
                         f"timm/<model> backbones have one); --format pt2 exports any backbone as a program plain "
                         f"PyTorch runs: m3i export --checkpoint {checkpoint} --format pt2 --out {out.with_suffix('.pt2')}")


def export(checkpoint: str | Path, out: str | Path, fmt: str = "timm", overwrite: bool = False) -> Path:
    """``m3i export``: write the backbone of ``checkpoint`` (a run or checkpoint folder) to ``out``
    in format ``fmt``. Every refusal comes before any work and before anything is written or
    moved; an earlier export at ``out`` is moved aside (``overwrite``) only once the new one is
    ready, and a failed write leaves nothing behind."""
    from . import runs
    from .runs import checkpoint as ckpt

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(out, fmt)
    held = "an earlier export" if holds_export(out, fmt) else None
    if not overwrite:
        runs.claim(out, False, held=held, choices="choose another --out")
    _writable(out)
    source = ckpt.find(Path(checkpoint))
    _check_not_in_checkpoints(source, out)
    _check_layout(runs.read_recipe(source).backbone.name, fmt, checkpoint, out)
    write = _WRITERS[fmt](runs.load_run(source), source)  # all the work (a trace, for pt2) before anything is moved
    runs.claim(out, overwrite, held=held, choices="choose another --out")
    with _staged(out) as path:
        write(path)
    return out


def export_timm(checkpoint: str | Path, out: str | Path) -> Path:
    return export(checkpoint, out, "timm")


def export_timm_dir(checkpoint: str | Path, out: str | Path) -> Path:
    return export(checkpoint, out, "timm-dir")


def export_program(checkpoint: str | Path, out: str | Path) -> Path:
    return export(checkpoint, out, "pt2")


def _save_weights(weights: dict, path: Path, metadata: dict) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(path), metadata=metadata)
    shared_mode(path)


def _timm_file(objective, source: Path):
    """The writer of one .safetensors file of timm-named weights."""
    backbone = objective.backbone
    weights = backbone.timm_state_dict()  # m3i-only tensors (the fill mask token) left out
    meta = {"format": "pt", "layout": "timm", "architecture": type(backbone).__name__}
    return lambda path: _save_weights(weights, path, meta)


def _trained(source: Path, steps: int) -> str:
    """The steps the checkpoint ``source`` was trained for, said for the model card."""
    step = int(source.name.removeprefix("step_")) if source.name.removeprefix("step_").isdigit() else None
    return f"{steps} steps" if step is None or step >= steps else f"step {step} of {steps}"


def _timm_dir(objective, source: Path):
    """The writer of the folder: config.json, model.safetensors, README.md (the module docstring)."""
    recipe, backbone = objective.recipe, objective.backbone
    weights = backbone.timm_state_dict()
    config = timm_config(backbone, recipe.backbone.name, objective.image_mean, objective.image_std)
    card = _CARD.format(name=recipe.backbone.name, recipe=recipe.name, steps=_trained(source, recipe.train.steps),
                        size=backbone.img_size, mean=config["pretrained_cfg"]["mean"],
                        std=config["pretrained_cfg"]["std"])
    meta = {"format": "pt", "m3i_backbone": recipe.backbone.name, "m3i_kwargs": json.dumps(recipe.backbone.kwargs())}

    def write(path: Path) -> None:
        path.mkdir()
        _save_weights(weights, path / "model.safetensors", meta)
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (path / "README.md").write_text(card)

    return write


class _Normalized(torch.nn.Module):
    """The backbone on images in [0, 1]: normalised as in training, then pooled features."""

    def __init__(self, backbone, mean, std):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features((images - self.mean) / self.std).pooled


def _program(objective, source: Path):
    """The writer of the ``.pt2`` program (the module docstring); the backbone is traced here."""
    backbone, size = objective.backbone, objective.backbone.img_size
    module = _Normalized(backbone, objective.image_mean, objective.image_std).eval()
    example = torch.rand(2, backbone.in_chans, size, size)
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as e:  # torch.export's many error types; a backbone it cannot trace is no bug of the run
        why = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ValueError(f"--format pt2: torch.export cannot trace backbone {objective.recipe.backbone.name} "
                         f"({why[:200]})") from None
    meta = {"backbone": objective.recipe.backbone.name, "image_size": size, "in_chans": backbone.in_chans,
            "mean": objective.image_mean, "std": objective.image_std, "embed_dim": backbone.embed_dim,
            "input": "float images in [0, 1], (B, C, S, S)", "output": "pooled features (B, D)"}
    return lambda path: torch.export.save(program, str(path), extra_files={"m3i.json": json.dumps(meta)})


_WRITERS = {"timm": _timm_file, "timm-dir": _timm_dir, "pt2": _program}
