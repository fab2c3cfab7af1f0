"""The sigmoid estimator's peak memory per rank against the global batch: each rank scores its own
images against every caption of the global batch (all-gathered with gradient), so its memory is
O(local batch × global batch); at a fixed batch per rank it grows linearly with the global batch
(the number of ranks), where one process holding the whole global batch grows with its square.

    PYTHONPATH=src python benchmarks/siglip_memory.py [--local 1024] [--dim 768] [--ranks 2 4] [--smoke]

Each global batch runs on that many gloo ranks of the CPU (``--ranks``), ``--local`` rows each:
one forward and backward of ``m3i.estimators.sigmoid.batch_sigmoid`` (the estimator's loss, the
gather and its backward included). Peak memory is what the call allocates above what it starts
with, on the CPU from ``torch.profiler``'s memory record (the allocations minus the frees, in
order: ``accumulation.peak_bytes``), on CUDA ``torch.cuda.max_memory_allocated``. Printed per
global batch: the largest peak over the ranks, that peak per (local × global) pair, and one process
on the whole global batch beside it. ``--smoke``: a few rows, to see that it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from accumulation import peak_bytes


def loss_step(local: int, dim: int, seed: int):
    """One forward and backward of the sigmoid loss on ``local`` random rows (``seed``: the rank's)."""
    from m3i.estimators.sigmoid import batch_sigmoid

    g = torch.Generator().manual_seed(seed)
    pred = torch.nn.functional.normalize(torch.randn(local, dim, generator=g), dim=1).requires_grad_()
    target = torch.nn.functional.normalize(torch.randn(local, dim, generator=g), dim=1).requires_grad_()
    avail = torch.ones(local, dtype=torch.bool)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)

    def step():
        batch_sigmoid(pred, target, avail, scale, bias).backward()

    return step


def _rank(rank: int, world: int, local: int, dim: int, init: str, out: str):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        step = loss_step(local, dim, rank)
        step()  # the process groups created, once
        peak = peak_bytes(step, torch.device("cpu"))
        peaks = [None] * world
        tdist.all_gather_object(peaks, peak)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(peaks, f)
    finally:
        tdist.destroy_process_group()


def ranks_peak(world: int, local: int, dim: int) -> int:
    """The largest peak over ``world`` gloo ranks of ``local`` rows each."""
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "peaks.json")
        mp.spawn(_rank, args=(world, local, dim, init, out), nprocs=world, join=True)
        with open(out) as f:
            return max(json.load(f))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--local", type=int, default=1024, help="rows per rank")
    ap.add_argument("--dim", type=int, default=768, help="embedding width")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="gloo ranks of each global batch")
    ap.add_argument("--smoke", action="store_true", help="a few rows: that it runs, no figure")
    args = ap.parse_args(argv)
    if args.smoke:
        args.local, args.dim = 32, 16
    rows = []
    for world in args.ranks:
        global_batch = world * args.local
        peak = ranks_peak(world, args.local, args.dim)
        one = peak_bytes(loss_step(global_batch, args.dim, 0), torch.device("cpu"))
        rows.append({"ranks": world, "local": args.local, "global": global_batch, "peak_per_rank": peak,
                     "bytes_per_pair": peak / (args.local * global_batch), "one_process": one})
    print(f"sigmoid loss, forward and backward, width {args.dim}: peak memory per rank")
    print("| global batch | ranks × local | peak per rank (MiB) | bytes per local × global pair | one process on the global batch (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['global']} | {r['ranks']} × {r['local']} | {r['peak_per_rank'] / 2**20:.2f} | "
              f"{r['bytes_per_pair']:.1f} | {r['one_process'] / 2**20:.2f} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"global batch × {b['global'] / a['global']:g}: peak per rank × {b['peak_per_rank'] / a['peak_per_rank']:.2f} "
              f"(linear: × {b['global'] / a['global']:g}), one process × {b['one_process'] / a['one_process']:.2f} "
              f"(quadratic: × {(b['global'] / a['global']) ** 2:g})")
    return rows


if __name__ == "__main__":
    main()
