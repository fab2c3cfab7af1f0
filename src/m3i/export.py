"""Export the pre-trained backbone alone, in timm's state-dict layout (ViT or ConvNeXt), for
timm and the detection / segmentation toolkits that load timm weights."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file


def export_timm(checkpoint: str | Path, out: str | Path) -> Path:
    from .eval.run import load_trained

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: expected a .safetensors file name")
    backbone = load_trained(checkpoint).backbone
    weights = backbone.timm_state_dict()  # m3i-only tensors (the fill mask token) left out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp),
              metadata={"format": "pt", "layout": "timm", "architecture": type(backbone).__name__})
    tmp.replace(out)
    return out
