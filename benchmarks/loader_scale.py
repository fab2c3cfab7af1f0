"""The scale half of benchmarks/loader.py (``--samples N``): m3i's indexed shards against
webdataset's streaming pipeline (and, optionally, wids' indexed reader) on one generated shard
set, with the same decode and resize. See benchmarks/loader.py for the usage."""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from common import ROOT, child_env, photo

POOL = 512  # distinct JPEGs, reused: decoding costs the same whatever the pixels


# -- the shard set ---------------------------------------------------------------------------
def _jpegs(w: int, h: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(POOL):
        b = io.BytesIO()
        photo(rng, w, h).save(b, "JPEG", quality=85)
        out.append(b.getvalue())
    return out


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def _write_shard(args) -> int:
    path, first, n, w, h = args
    jpegs = _jpegs(w, h)
    tmp = path + ".partial"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(first, first + n):
            key = f"{i:09d}"
            _member(tf, key + ".cls", str(i % 1000).encode())
            _member(tf, key + ".jpg", jpegs[(i * 7919) % POOL])
            _member(tf, key + ".txt", f"a photo, number {i}".encode())
    os.replace(tmp, path)
    return n


def make_shards(root: Path, samples: int, shards: int, w: int = 96, h: int = 72, processes: int = 2) -> list[str]:
    """``samples`` samples (KEY.jpg of w×h, KEY.txt, KEY.cls) in ``shards`` tar files under
    ``root``; kept, and reused when asked for again with the same figures."""
    root.mkdir(parents=True, exist_ok=True)
    conf = {"samples": samples, "shards": shards, "photo": [w, h], "pool": POOL}
    done = root / "complete.json"
    names = [str(root / f"{k:06d}.tar") for k in range(shards)]
    if done.is_file() and json.loads(done.read_text()) == conf:
        return names
    bounds = np.linspace(0, samples, shards + 1).astype(int)
    jobs = [(names[k], int(bounds[k]), int(bounds[k + 1] - bounds[k]), w, h) for k in range(shards)]
    t = time.perf_counter()
    with get_context("fork").Pool(processes) as pool:
        for j, _ in enumerate(pool.imap_unordered(_write_shard, jobs)):
            if j % 20 == 0:
                print(f"  writing shards: {j}/{shards} ({time.perf_counter() - t:.0f} s)", flush=True)
    done.write_text(json.dumps(conf))
    return names


# -- the pipelines, one per probe process ------------------------------------------------------
def _collate(rows):
    import torch

    from m3i.data.mixture import channels_first

    arrs, labels, captions = zip(*rows)  # the mixture's collation: one (B, 3, S, S) uint8 tensor
    return {"image": channels_first(np.stack(arrs)), "label": torch.tensor(labels), "caption": list(captions)}


def _decoder(size: int):
    from m3i.data.mixture import image_array
    from m3i.data.images import decode_image

    def decode(sample):  # what Mixture does with a sample: decode (draft), RGB, resize, label, caption
        ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in sample or "." + e in sample)
        data = sample.get(ext, sample.get("." + ext))
        data = data.getvalue() if hasattr(data, "getvalue") else data
        cls = sample.get("cls", sample.get(".cls"))
        cls = cls.getvalue() if hasattr(cls, "getvalue") else cls
        txt = sample.get("txt", sample.get(".txt"))
        txt = txt.getvalue() if hasattr(txt, "getvalue") else txt
        return (image_array(decode_image(data, (size, size)), size), int(cls) if cls else -1,
                txt.decode() if txt else None)

    return decode


def m3i_loader(a):
    import torch

    from m3i.data import Mixture, Shards

    t0 = time.perf_counter()
    src = Shards(a.pattern, progress=False)
    opened = time.perf_counter() - t0
    mix = Mixture([src], None, a.batch, a.size, seed=0, rank=a.rank, world_size=a.world)
    return opened, torch.utils.data.DataLoader(mix, batch_size=None, num_workers=a.workers,
                                               prefetch_factor=2 if a.workers else None)


def wds_loader(a):
    import torch
    import webdataset as wds

    from m3i.data.shards import expand_shards

    os.environ.update(RANK=str(a.rank), WORLD_SIZE=str(a.world))  # split_by_node reads them
    urls = expand_shards(a.pattern)
    pipe = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0, nodesplitter=wds.split_by_node,
                           workersplitter=wds.split_by_worker, empty_check=False)
            .shuffle(1000).map(_decoder(a.size)).batched(a.batch, collation_fn=_collate, partial=False))
    return 0.0, torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=a.workers,
                                            prefetch_factor=2 if a.workers else None)


def wids_loader(a):
    """wids' ShardListDataset read at random like the mixture (uniform indices, with
    replacement), one LRU slot per shard so that no shard is indexed twice in a process."""
    import torch

    sys.path.insert(0, a.wids)
    import wids

    shards = json.loads(Path(a.wids_list).read_text())
    decode = _decoder(a.size)

    class Random(torch.utils.data.IterableDataset):
        def __iter__(self):
            ds = wids.ShardListDataset(shards, lru_size=len(shards), localname=lambda url: url, transformations=[])
            g = np.random.default_rng(a.rank)
            while True:
                yield _collate([decode(ds[int(i)]) for i in g.integers(0, len(ds), a.batch)])

    return 0.0, torch.utils.data.DataLoader(Random(), batch_size=None, num_workers=a.workers,
                                            prefetch_factor=2 if a.workers else None)


def memory(pid: int) -> dict[str, int]:
    """Rss and Pss (the process's share of pages mapped by several) in bytes."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean"):
                out[k.lower()] = int(rest.split()[0]) * 1024
    return out


def children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def probe_main() -> None:
    """A child process. One kind (``--probe m3i``): one rank of that pipeline, started, a few
    batches taken, its times and the memory of it and its workers reported. Several kinds
    (``--probe m3i,wds``, no workers): throughput side by side, each pipeline started and warmed
    up, then one timed batch of each in turn, so that every pipeline sees the same machine load."""
    p = argparse.ArgumentParser()
    p.add_argument("--probe", required=True)
    for k in ("pattern", "out", "wids", "wids_list"):
        p.add_argument(f"--{k.replace('_', '-')}", dest=k)
    for k, v in (("size", 64), ("batch", 256), ("workers", 0), ("rank", 0), ("world", 1), ("batches", 10),
                 ("warmup", 2)):
        p.add_argument(f"--{k}", type=int, default=v)
    a = p.parse_args()
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores, on purpose
    kinds = a.probe.split(",")
    report, its = {}, {}
    for kind in kinds:
        t0 = time.perf_counter()
        opened, loader = {"m3i": m3i_loader, "wds": wds_loader, "wids": wids_loader}[kind](a)
        its[kind] = iter(loader)
        next(its[kind])
        report[kind] = {"opened_s": opened, "first_batch_s": time.perf_counter() - t0, "cpu_s": 0.0, "wall_s": 0.0,
                        "images": a.batches * a.batch}
        for _ in range(a.warmup):
            next(its[kind])
    for _ in range(a.batches):
        for kind in kinds:
            c0, w0 = time.process_time(), time.perf_counter()
            b = next(its[kind])
            report[kind]["cpu_s"] += time.process_time() - c0
            report[kind]["wall_s"] += time.perf_counter() - w0
            assert b["image"].shape == (a.batch, 3, a.size, a.size)
    if len(kinds) == 1:
        me = os.getpid()
        report[kinds[0]]["memory"] = [{"role": "rank", **memory(me)}] + [{"role": "worker", **memory(c)}
                                                                         for c in children(me)]
    Path(a.out).write_text(json.dumps(report))


# -- the comparison ----------------------------------------------------------------------------
def probe(a, kinds: str, out: Path, batches: int, *extra: str) -> list[str]:
    """The command of a probe process of ``kinds`` (comma-separated) writing its report to ``out``."""
    return [sys.executable, str(Path(__file__).with_name("loader.py")), "--probe", kinds, "--pattern", a.pattern,
            "--size", str(a.size), "--batch", str(a.batch), "--batches", str(batches), "--out", str(out), *extra]


def run_probes(a, kind: str, ranks: int, workers: int, batches: int, tmp: Path, extra=()) -> list[dict]:
    """``ranks`` probe processes of ``kind`` at once; -> their reports."""
    procs, outs = [], []
    for r in range(ranks):
        out = tmp / f"{kind}-{ranks}x{workers}-{r}.json"
        outs.append(out)
        cmd = probe(a, kind, out, batches, "--workers", str(workers), "--rank", str(r), "--world", str(ranks), *extra)
        procs.append(subprocess.Popen(cmd, env=child_env(OMP_NUM_THREADS="1")))
    for pr in procs:
        if pr.wait():
            raise SystemExit(f"{kind} probe failed (exit {pr.returncode})")
    return [json.loads(o.read_text())[kind] for o in outs]


def settings() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="m3i's indexed shards against webdataset's streaming pipeline")
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--shards", type=int, help="default: max(100, samples / 8000)")
    p.add_argument("--data", help="where the shard set goes (default: a folder under the system's temp)")
    p.add_argument("--photo", default="96x72", help="JPEG size WxH")
    p.add_argument("--size", type=int, default=64, help="training resolution the loader resizes to")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=20, help="timed batches per throughput run")
    p.add_argument("--repeats", type=int, default=2, help="throughput runs per pipeline, alternated")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank (memory)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--index-processes", type=int, help="processes that build the index (default: one per CPU)")
    p.add_argument("--wids", help="a folder holding the wids package, to add wids' indexed reader")
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(ROOT / "results" / "loader-scale.json"))
    return p.parse_args()


def build_index(a, paths: list[str]):
    """m3i's index of the shards, built anew -> (the index, its figures)."""
    from m3i.data.index import index_paths, open_index

    for old in index_paths(paths):
        old.unlink(missing_ok=True)
    t, c = time.perf_counter(), os.times()
    idx = open_index(paths, processes=a.index_processes, progress=False)
    build, c2 = time.perf_counter() - t, os.times()
    cpu = sum(c2[:4]) - sum(c[:4])  # this process and the scanning processes
    per_sample = idx.nbytes / len(idx)
    print(f"index: built in {build:.1f} s ({cpu:.1f} CPU-s), {idx.nbytes / 1e6:.1f} MB = {per_sample:.1f} bytes/sample",
          flush=True)
    return idx, {"build_s": build, "build_cpu_s": cpu, "bytes": idx.nbytes, "bytes_per_sample": per_sample,
                 "samples": len(idx)}


def start_up(a, kind: str, tmp: Path, extra) -> dict:
    """Start-up and memory of ``kind``: RANKS ranks of WORKERS workers each, at once."""
    # wids indexes each shard again in every process: one process without workers is enough to see it
    ranks, workers = (1, 0) if kind == "wids" else (a.ranks, a.workers)
    reps = run_probes(a, kind, ranks, workers, 2, tmp, extra)
    print(f"{kind}: {ranks} ranks x {workers} workers started, first batch after "
          f"{max(r['first_batch_s'] for r in reps):.1f} s", flush=True)
    return {"opened_s": max(r["opened_s"] for r in reps), "first_batch_s": max(r["first_batch_s"] for r in reps),
            "memory": [r["memory"] for r in reps]}


def throughput(a, res: dict, kinds: list[str], tmp: Path, extra) -> None:
    """One process without workers running every pipeline, a batch of each in turn, --repeats times."""
    out = tmp / "throughput.json"
    for rep in range(a.repeats):
        subprocess.run(probe(a, ",".join(kinds), out, a.batches, *extra), env=child_env(OMP_NUM_THREADS="1"),
                       check=True)
        for kind, r in json.loads(out.read_text()).items():
            res[kind].setdefault("img_per_cpu_s", []).append(r["images"] / r["cpu_s"])
            res[kind].setdefault("img_per_s", []).append(r["images"] / r["wall_s"])
            print(f"  {kind} run {rep + 1}: {r['images'] / r['cpu_s']:.0f} img per CPU-s "
                  f"({r['images'] / r['wall_s']:.0f} img/s wall)", flush=True)


def main() -> None:
    a = settings()
    n_shards = a.shards or max(100, a.samples // 8000)
    data = Path(a.data) if a.data else Path(os.environ.get("TMPDIR", "/tmp")) / f"m3i-loader-{a.samples}"
    w, h = (int(v) for v in a.photo.split("x"))
    t = time.perf_counter()
    paths = make_shards(data, a.samples, n_shards, w, h)
    print(f"shard set: {a.samples:,} samples in {n_shards} shards under {data} ({time.perf_counter() - t:.0f} s)",
          flush=True)
    a.pattern = f"{data}/{{000000..{n_shards - 1:06d}}}.tar"
    tmp = data / "probe"
    tmp.mkdir(exist_ok=True)
    idx, built = build_index(a, paths)
    res = {"config": dict(vars(a)), "cpus": os.cpu_count(), "note": a.note, "index": built}
    kinds, extra = ["m3i", "wds"], {}
    if a.wids:
        shards = [{"url": s["path"], "nsamples": s["samples"]} for s in idx.shards]
        (tmp / "wids.json").write_text(json.dumps(shards))
        extra["wids"] = ["--wids", a.wids, "--wids-list", str(tmp / "wids.json")]
        kinds.append("wids")
    for kind in kinds:
        res[kind] = start_up(a, kind, tmp, extra.get(kind, ()))
    throughput(a, res, kinds, tmp, extra.get("wids", ()))
    table(res, kinds, a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


def table(res: dict, kinds: list[str], a) -> None:
    names = {"m3i": "m3i Shards (index)", "wds": "webdataset WebDataset", "wids": "wids ShardListDataset"}
    mb = 1 / 2**20
    rows = [("index build", lambda k: f"{res['index']['build_s']:.1f} s ({res['index']['build_cpu_s']:.0f} CPU-s)"
             if k == "m3i" else "none (streams)"
             if k == "wds" else "per process, at first read of each shard"),
            ("index size", lambda k: f"{res['index']['bytes_per_sample']:.1f} B/sample, shared" if k == "m3i"
             else "-" if k == "wds" else "Python lists per process"),
            ("source open (existing index)", lambda k: f"{res[k]['opened_s']:.2f} s" if k == "m3i" else "-"),
            ("start-up to first batch", lambda k: f"{res[k]['first_batch_s']:.1f} s")]
    def per(k, key, role):
        vals = [w[key] for m in res[k]["memory"] for w in m if w["role"] == role]
        return f"{np.mean(vals) * mb:.0f}" if vals else "-"

    for what, key in (("RSS", "rss"), ("PSS", "pss")):
        rows.append((f"{what} per rank / per worker, MiB", lambda k, key=key: f"{per(k, key, 'rank')} / {per(k, key, 'worker')}"))
        rows.append((f"{what} in all, MiB", lambda k, key=key: f"{sum(w[key] for m in res[k]['memory'] for w in m) * mb:.0f}"))
    rows.append(("img per loader CPU-second, side by side", lambda k: " / ".join(f"{v:.0f}" for v in res[k]["img_per_cpu_s"])))
    base = np.asarray(res["wds"]["img_per_cpu_s"])
    rows.append(("  against webdataset", lambda k: " / ".join(f"{v:.2f}x" for v in np.asarray(res[k]["img_per_cpu_s"]) / base)))
    print(f"\n{a.samples:,} samples, {a.photo} JPEGs resized to {a.size} px, batch {a.batch}, {os.cpu_count()} CPUs. "
          f"{a.note}")
    shape = {k: f"{len(res[k]['memory'])} rank(s) x {len(res[k]['memory'][0]) - 1} workers" for k in kinds}
    print("| | " + " | ".join(f"{names[k]}, {shape[k]}" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for what, f in rows:
        print(f"| {what} | " + " | ".join(f(k) for k in kinds) + " |")
