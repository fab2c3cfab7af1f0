"""Multi-crop in the loader: what DINO's local crops cost beside today's two views, per image and
per crop pixel, in one loader process (the views cut in the loader, `m3i.views.LoaderViews`, from
each decoded original).

    python benchmarks/multicrop.py [--photo 500x375] [--images 256] [--batch 64] [--batches 8] [--local 8]
    python benchmarks/multicrop.py --smoke        # a few tiny batches: that it runs, no figures to keep

Two settings, each with (a) today's two global views and (b) the same two views plus N local crops
(`views.local`, its default augmentation: DINOv2's crop scale 0.05–0.32):

- DINO's: 2 × 224 px + N × 96 px, cut from synthetic photo-like JPEGs of --photo size (an image
  folder; JPEG draft decoding as training reads them);
- the demo's: 2 × 32 px + N × 16 px, from the built-in mix (Fashion-MNIST and emoji, as the CPU
  recipes read them; synthetic 48-px PNGs where it is not at hand).

The variants of a setting run in turn, one batch each (after a warm-up batch of each), so that they
see the same machine load; a batch's loader CPU time is the process's CPU time (`time.process_time`)
of `Mixture.batch`: reading, decoding, drawing every view's parameters, cutting and resizing the
crops. Prints images per loader CPU-second and crop pixels per loader CPU-second side by side, and
(b) against (a) per crop pixel (above 1: multi-crop costs less per crop pixel). Writes
results/multicrop.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, photo, table_head
from m3i.config import LocalViewsCfg, ViewsCfg, builtin_mix
from m3i.data import Mixture, build_source
from m3i.views import ViewStage


def stage(global_size: int, local_size: int, local: int, patch: int) -> ViewStage:
    """The view stage of two global views of ``global_size`` and ``local`` local crops of ``local_size``."""
    cfg = ViewsCfg(count=2, local=LocalViewsCfg(count=local, size=local_size) if local else None)
    grid = (global_size // patch, global_size // patch)
    return ViewStage(cfg, [], global_size, grid, 3)


def jpeg_folder(root: Path, n: int, w: int, h: int) -> str:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        photo(rng, w, h).save(d / f"{i:06d}.jpg", quality=90)
    return f"folder:{root}"


def png_folder(root: Path, n: int, side: int) -> str:
    rng = np.random.default_rng(1)
    for i in range(n):
        d = root / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        photo(rng, side, side).save(d / f"{i:06d}.png")
    return f"folder:{root}"


def demo_sources(tmp: Path, n: int):
    """The built-in mix's sources and weights, or synthetic 48-px PNGs where it is not at hand."""
    try:
        mix = builtin_mix()
        return [build_source(s.spec, labels=s.labels, captions=s.captions) for s in mix], [s.weight for s in mix], \
            "the built-in mix"
    except (OSError, ValueError, RuntimeError) as e:
        print(f"  (the built-in mix is not at hand: {str(e)[:80]}; synthetic 48-px PNGs instead)")
        return [build_source(png_folder(tmp / "demo", n, 48))], None, "synthetic 48-px PNGs"


def run_setting(name: str, sources, weights, sizes: tuple[int, int], local: int, patch: int, a) -> list[dict]:
    """(a) two global views and (b) with ``local`` local crops, batches in turn -> one row each."""
    g, s = sizes
    variants = {"two views": stage(g, s, 0, patch), f"two views + {local} local": stage(g, s, local, patch)}
    mixes, cpu = {}, {k: 0.0 for k in variants}
    for k, st in variants.items():
        mixes[k] = Mixture(sources, weights, a.batch, g, seed=0)
        mixes[k].views = st.loader_views(0)
        mixes[k].batch(0)  # warm-up: first reads, caches
    for step in range(1, a.batches + 1):
        for k in variants:
            c0 = time.process_time()
            b = mixes[k].batch(step)
            cpu[k] += time.process_time() - c0
            assert len(b.crops) == variants[k].cfg.total
    rows = []
    for k, st in variants.items():
        px = sum(aug.size[0] * aug.size[1] for aug in st.augment)
        img = a.batches * a.batch / max(cpu[k], 1e-9)
        rows.append({"setting": name, "views": k, "crops": st.cfg.total, "crop_px_per_image": px,
                     "decode_side": mixes[k].views.side, "img_per_cpu_s": img, "crop_px_per_cpu_s": img * px,
                     "cpu_s": cpu[k]})
    base = rows[0]["crop_px_per_cpu_s"]
    for r in rows:
        r["per_crop_px_vs_two_views"] = r["crop_px_per_cpu_s"] / base
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photo", default="500x375", help="the JPEGs of DINO's setting, WxH (ImageNet's typical size)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--local", type=int, default=8, help="local crops (DINO: 8)")
    p.add_argument("--smoke", action="store_true", help="a few tiny batches: that it runs")
    p.add_argument("--note", default="", help="e.g. that the machine was shared")
    p.add_argument("--out", default=str(ROOT / "results" / "multicrop.json"))
    a = p.parse_args()
    if a.smoke:
        a.photo, a.images, a.batch, a.batches = "96x72", 16, 8, 1
    torch.set_num_threads(1)
    w, h = (int(v) for v in a.photo.split("x"))
    print(f"loader views in one process, batch {a.batch}, {a.batches} batches per variant, {os.cpu_count()} CPUs "
          f"here. {a.note}")
    with tempfile.TemporaryDirectory() as tmp:
        photos = build_source(jpeg_folder(Path(tmp) / "photos", a.images, w, h))
        demo, weights, demo_from = demo_sources(Path(tmp), a.images)
        rows = run_setting(f"DINO's: 224 + 96 px, {a.photo} JPEGs", [photos], None, (224, 96), a.local, 16, a)
        rows += run_setting(f"the demo's: 32 + 16 px, {demo_from}", demo, weights, (32, 16), a.local, 4, a)
    print("\n".join(table_head(["setting", "views", "crop px per image", "img per loader CPU-s",
                                "crop px per loader CPU-s", "per crop px, against two views"])))
    for r in rows:
        print(f"| {r['setting']} | {r['views']} | {r['crop_px_per_image']} | {r['img_per_cpu_s']:.0f} | "
              f"{r['crop_px_per_cpu_s'] / 1e6:.2f} M | {r['per_crop_px_vs_two_views']:.2f}x |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
