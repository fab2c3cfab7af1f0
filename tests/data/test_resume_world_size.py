"""A run on 2 ranks, resumed on 1, then on 2 and on 4 again (gloo processes, the trainer's own
mixture and DataLoader) reads at every step the samples, and the pixels, that one uninterrupted
rank reads."""
from __future__ import annotations

import io
import json

import pytest
import torch
import torch.distributed as tdist
from PIL import Image

from m3i.config import load_recipe
from m3i.train import loop
from ranks import run_ranks

GLOBAL_BATCH = 8
PHASES = [(2, 0, 3), (1, 3, 5), (2, 5, 7), (4, 7, 9)]  # (ranks, first step, end step)


def write_shards(root):
    import webdataset as wds

    k = 0
    for s in range(3):
        with wds.TarWriter(str(root / f"{s:06d}.tar")) as w:
            for _ in range(5):
                buf = io.BytesIO()
                Image.new("RGB", (6, 6), (k * 16, 255 - k * 16, s * 40)).save(buf, format="PNG")
                w.write({"__key__": f"k{k:04d}", "png": buf.getvalue(), "txt": f"sample {k}", "cls": str(k % 4)})
                k += 1


def recipe(root):
    return load_recipe("m3i", overrides=[f"data.sources=[{{spec: 'shards:{root}/*.tar'}}, {{spec: 'shards:{root}/000001.tar'}}]",
                                         f"data.batch_size={GLOBAL_BATCH}", "data.image_size=4", "train.seed=3"])


def read_steps(rank: int, world: int, root, start: int, stop: int) -> list[dict]:
    """What this rank's DataLoader gives for the steps start … stop-1: per step, its sample ids
    (source, key) and pixels."""
    mixture = loop.build_mixture(recipe(root), rank, world)
    mixture.start_step, mixture.num_steps = start, stop
    loader = torch.utils.data.DataLoader(mixture, batch_size=None, num_workers=2 if rank == 0 else 0)
    out = []
    for b in loader:
        ids = [[int(k), mixture.sources[int(k)].key(int(i))] for k, i in zip(b["source"], b["index"])]
        out.append({"step": b["step"], "ids": ids, "pixels": b["image"].flatten().tolist()})
    return out


def _phase(rank, world, root, start, stop, out):
    mine = read_steps(rank, world, root, start, stop)
    every = [None] * world
    tdist.all_gather_object(every, mine)  # the global batch: the ranks' slices in rank order
    if rank == 0:
        steps = [{"step": parts[0]["step"], "ids": sum((p["ids"] for p in parts), []),
                  "pixels": sum((p["pixels"] for p in parts), [])} for parts in zip(*every)]
        with open(out, "w") as f:
            json.dump(steps, f)


@pytest.mark.slow
def test_resume_on_other_world_sizes_continues_the_global_stream(tmp_path):
    write_shards(tmp_path)
    one = read_steps(0, 1, tmp_path, 0, PHASES[-1][2])  # one rank, uninterrupted
    got = []
    for n, (world, start, stop) in enumerate(PHASES):
        out = tmp_path / f"phase{n}.json"
        # forked: the ranks start with m3i already imported (a spawned process spends seconds on it)
        run_ranks(_phase, world, tmp_path, start, stop, str(out), world=world, start_method="fork")
        got += json.loads(out.read_text())
    assert [s["step"] for s in got] == [s["step"] for s in one] == list(range(PHASES[-1][2]))
    for a, b in zip(got, one):
        assert len(a["ids"]) == GLOBAL_BATCH
        assert a["ids"] == b["ids"], a["step"]
        assert a["pixels"] == b["pixels"], a["step"]
    keys = {tuple(x) for s in one for x in s["ids"]}
    assert len(keys) > GLOBAL_BATCH and {k for k, _ in keys} == {0, 1}  # both sources, many samples
