"""Small real data sets for the command-line suite, written by the tests: image folders in every
layout, JSONL / CSV manifests (with or without a byte-order mark), WebDataset tar shards, and
``m3i`` as a child process where a test needs one."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

TINY = str(Path(__file__).parents[1] / "faults" / "tiny.yaml")  # a one-block ViT, 16 px, label + SimCLR terms
FAST = ["--no-progress", "--device", "cpu", "data.num_workers=0", "train.log_every=1", "train.precision=fp32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COLOURS = {"a": (230, 30, 30), "b": (30, 30, 230), "c": (30, 200, 30)}


def png(colour, seed: int, size: int = 12) -> bytes:
    """A PNG of ``colour`` with a little seeded noise (k-NN can tell the colours apart)."""
    g = np.random.default_rng(seed)
    px = np.clip(np.array(colour)[None, None] + g.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(px).save(b, "PNG")
    return b.getvalue()


def images(folder: Path, n: int, colour=(128, 128, 128), seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        p.write_bytes(png(colour, seed * 1000 + i))
        out.append(p)
    return out


def class_root(root: Path, n: int = 8, classes: str = "ab", seed: int = 0) -> Path:
    """``root/<class>/NNN.png``: one subfolder per class."""
    for k, c in enumerate(classes):
        images(root / c, n, COLOURS[c], seed=seed + k)
    return root


def split_root(root: Path, sizes: dict[str, int], classes: str = "ab") -> Path:
    """``root/<split>/<class>/NNN.png``, the ImageNet layout."""
    for k, (split, n) in enumerate(sizes.items()):
        class_root(root / split, n, classes, seed=10 * (k + 1))
    return root


def write_jsonl(path: Path, rows: list[dict], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8-sig" if bom else "utf-8")
    return path


def write_csv(path: Path, rows: list[dict], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:  # Excel's "CSV UTF-8"
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def labelled_rows(folder: Path, names: dict[str, str]) -> list[dict]:
    """Manifest rows (paths relative to ``folder``'s parent, where the manifest goes) for
    ``folder/<class>/*.png``; ``names`` maps a class folder to its label cell."""
    return [{"path": str(p.relative_to(folder.parent)), "caption": f"a {c} square", "label": label}
            for c, label in names.items() for p in sorted((folder / c).glob("*.png"))]


def shard(path: Path, samples: list[tuple[str, bytes, str | None, str | None]]) -> Path:
    """A WebDataset tar shard of (key, png bytes, caption, .cls text) samples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, data, caption, cls in samples:
            for ext, payload in (("png", data), ("txt", caption), ("cls", cls)):
                if payload is None:
                    continue
                raw = payload if isinstance(payload, bytes) else payload.encode()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(raw)
                tf.addfile(info, io.BytesIO(raw))
    return path


def sources(*specs: str) -> str:
    return "data.sources=[" + ", ".join("{spec: " + json.dumps(s) + "}" for s in specs) + "]"


def run_m3i(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m3i.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def error_line(err: str) -> str:
    """The one line ``m3i`` prints for a user's mistake (library warnings left out); fails on a traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("m3i ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
