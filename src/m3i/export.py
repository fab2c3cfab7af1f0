"""Export the pre-trained backbone alone, in timm's state-dict layout (ViT or ConvNeXt), for
timm and the detection / segmentation toolkits that load timm weights."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from .train import checkpoint as ckpt

EXPORT_SKIP = ("mask_token",)  # m3i-only parameters (SimMIM fill token)


def backbone_weights(checkpoint: str | Path) -> dict:
    weights, _ = ckpt.load(Path(checkpoint))
    out = {k.removeprefix("backbone."): v for k, v in weights.items()
           if k.startswith("backbone.") and not k.removeprefix("backbone.").startswith(EXPORT_SKIP)}
    if not out:
        raise ValueError(f"{checkpoint}: the checkpoint holds no backbone weights")
    return out


def export_timm(checkpoint: str | Path, out: str | Path) -> Path:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: expected a .safetensors file name")
    weights = backbone_weights(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata={"format": "pt", "layout": "timm"})
    tmp.replace(out)
    return out
