"""What an m3i export looks like (``m3i export``'s formats), so that a run folder, a checkpoint
and an export are told apart wherever a path is given."""
from __future__ import annotations

import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

DIR_FILES = ("config.json", "model.safetensors", "README.md")
FORMATS = ("timm", "timm-dir", "pt2")
SUFFIX = {"timm": ".safetensors", "pt2": ".pt2"}
LOADED_BY = {"timm": "timm's weights of one model",
              "timm-dir": "timm.create_model('local-dir:{path}', pretrained=True) builds it",
              "pt2": "torch.export.load('{path}').module() runs it"}


def export_format(path: str | Path) -> str | None:
    """The format of the m3i export at ``path`` (one of :data:`FORMATS`), or None: a timm-dir folder
    holds config.json and model.safetensors (and its card); a timm file says so in its metadata;
    a pt2 archive carries m3i.json."""
    path = Path(path)
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        return "timm-dir" if set(DIR_FILES[:2]) <= names <= set(DIR_FILES) else None
    if not path.is_file():
        return None
    try:
        if path.suffix == ".pt2":
            with zipfile.ZipFile(path) as z:
                return "pt2" if any(n.endswith("/extra/m3i.json") for n in z.namelist()) else None
        with safe_open(str(path), "pt") as f:
            return "timm" if (f.metadata() or {}).get("layout") == "timm" else None
    except (OSError, ValueError, zipfile.BadZipFile, SafetensorError):
        return None


def holds_export(out: Path, fmt: str) -> bool:
    """Whether ``out`` holds an earlier export of format ``fmt`` (what ``--overwrite`` may move aside)."""
    return export_format(out) == fmt


def refuse_export(path: Path) -> None:
    """Raise a one-line ValueError when ``path``, given for a run or a checkpoint, is an export."""
    fmt = export_format(path)
    if fmt is not None:
        raise ValueError(f"{path}: an m3i export (--format {fmt}; {LOADED_BY[fmt].format(path=path)}), not a run or checkpoint; "
                         f"give the run folder it was exported from")
