"""Loader throughput: `Mixture` images/s from WebDataset shards and from an image folder at the
training resolution, with N DataLoader workers, beside the training step's images/s, and the
number of loader cores one GPU needs.

    python benchmarks/loader.py [--size 224] [--workers 0 1] [--photo 500x375 1600x1200] [--images 384]

At scale, m3i's indexed shards beside webdataset's own streaming pipeline on the same shards:

    python benchmarks/loader.py --samples 1000000 --data /big/disk/loader-1m [--workers 8 --ranks 2]

generates the shard set (small JPEGs + caption + label, at least 100 shards; kept for the next
run) and prints side by side: index build time, start-up with an existing index, RSS and PSS
per worker and in all for WORKERS workers × RANKS ranks, and images per CPU-second of one
loader process (decode, resize to --size, collate: `m3i.data.mixture.image_array` for both).
With --wids DIR (a folder holding webdataset's `wids` package, from webdataset 0.2.x) it adds
wids' indexed reader at random access. Writes results/loader-scale.json.

It writes synthetic photo-like JPEGs (smooth colour fields with grain, quality 90; JPEG decoding
time depends on the pixel count, not the content) of each --photo size as an image folder and as
WebDataset shards, then times `Mixture.batch` through a DataLoader, with PIL's JPEG draft mode
(decoding at a reduced scale that still covers the training size) and without. The training step's
images/s comes from results/gpu.json (benchmarks/gpu_check.py: the ViT-B/16 m3i step) when present,
else from --step-img-per-s. Prints a table and writes results/loader.json.

Cores per GPU = step images/s ÷ images/s of one loader core (0 workers: the main process alone).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import loader_scale as scale
from common import ROOT, photo, table_head
from m3i.data import Mixture, build_source


def write_data(root: Path, n: int, w: int, h: int) -> tuple[str, str]:
    """n JPEGs as a class-folder tree and as 4 WebDataset shards; -> (folder spec, shards spec)."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    folder, shards = root / "folder", root / "shards"
    shards.mkdir(parents=True)
    writers = [wds.TarWriter(str(shards / f"{k:06d}.tar")) for k in range(4)]
    for i in range(n):
        cls = i % 10
        (folder / f"c{cls}").mkdir(parents=True, exist_ok=True)
        path = folder / f"c{cls}" / f"{i:06d}.jpg"
        photo(rng, w, h).save(path, quality=90)
        writers[i % 4].write({"__key__": f"{i:06d}", "jpg": path.read_bytes(), "txt": f"photo number {i}",
                              "cls": str(cls)})
    for wr in writers:
        wr.close()
    return f"folder:{folder}", f"shards:{shards}/{{000000..000003}}.tar"


def rate(spec: str, size: int, batch: int, workers: int, draft: bool, batches: int) -> float:
    mixture = Mixture([build_source(spec)], [1.0], batch, size, seed=0)
    if not draft:
        mixture._draft = [False] * len(mixture.sources)
    loader = torch.utils.data.DataLoader(mixture, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    it = iter(loader)
    for _ in range(max(2, workers)):  # start-up: worker processes, first batches
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        assert b["image"].shape == (batch, 3, size, size)
    dt = time.perf_counter() - t0
    del it
    return batches * batch / dt


def step_rate(args) -> tuple[float | None, str]:
    if args.step_img_per_s:
        return args.step_img_per_s, "--step-img-per-s"
    gpu = ROOT / "results" / "gpu.json"
    if gpu.is_file():
        res = json.loads(gpu.read_text())
        best = None
        for key in ("vit", "vit_compile"):
            s = res.get("sections", {}).get(key, {})
            if s.get("ok") and s.get("img_per_s") and (best is None or s["img_per_s"] > best[0]):
                best = (s["img_per_s"], f"results/gpu.json {key} ({res['environment'].get('gpu', '?')})")
        if best:
            return best
    return None, "none (run benchmarks/gpu_check.py on a GPU, or pass --step-img-per-s)"


def main() -> None:
    if "--probe" in sys.argv:
        return scale.probe_main()
    if "--samples" in sys.argv:
        return scale.main()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--photo", nargs="+", default=["500x375", "1600x1200"], help="source JPEG sizes, WxH")
    p.add_argument("--step-img-per-s", type=float, help="the training step's images/s (else results/gpu.json)")
    p.add_argument("--loader-cores", type=int, default=15, help="cores one GPU's loader may use (16-core box: 15)")
    p.add_argument("--note", default="", help="e.g. that the machine was shared")
    p.add_argument("--out", default=str(ROOT / "results" / "loader.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    step, step_from = step_rate(a)
    rows = []
    print(f"Mixture at {a.size} px, batch {a.batch}, {os.cpu_count()} CPUs here. {a.note}")
    with tempfile.TemporaryDirectory() as tmp:
        for ph in a.photo:
            w, h = (int(v) for v in ph.split("x"))
            specs = write_data(Path(tmp) / ph, a.images, w, h)
            for spec in specs:
                kind = spec.split(":")[0]
                for draft in (True, False):
                    for nw in a.workers:
                        r = rate(spec, a.size, a.batch, nw, draft, a.batches)
                        rows.append({"photo": ph, "source": kind, "draft": draft, "workers": nw, "img_per_s": r})
                        print(f"  {ph:>9} {kind:<6} draft={'on ' if draft else 'off'} workers={nw}: {r:7.0f} img/s",
                              flush=True)
    print(f"\ntraining step: {f'{step:.0f} img/s' if step else '?'} (from {step_from})")
    print("\n".join(table_head(["source photo", "source", "draft", "img/s, 1 core", "cores per GPU",
                                 f"loader img/s on {a.loader_cores} cores"])))
    summary = []
    for r in rows:
        if r["workers"] != 0:
            continue
        cores = step / r["img_per_s"] if step else None
        summary.append(dict(r, cores_per_gpu=cores, img_per_s_on_loader_cores=r["img_per_s"] * a.loader_cores))
        print(f"| {r['photo']} | {r['source']} | {'on' if r['draft'] else 'off'} | {r['img_per_s']:.0f} | "
              f"{f'{cores:.1f}' if cores else '?'} | {r['img_per_s'] * a.loader_cores:.0f} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "cpus": os.cpu_count(), "step_img_per_s": step,
                               "step_from": step_from, "runs": rows, "summary": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
