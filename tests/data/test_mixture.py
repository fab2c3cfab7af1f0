"""The weighted mixture: batch format, class offsets, weights, determinism, resume, workers,
unreadable images."""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from m3i.data import (
    FASHION_MNIST_CLASSES,
    Emoji,
    FashionMNIST,
    ImageFolder,
    Manifest,
    Mixture,
    Shards,
    SourceUnreadableError,
    data_root,
)
from m3i.data.images import ReadFailed
from m3i.batch import Batch

COLORS = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}


def png(path: Path, color, size=(12, 7)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def corrupt(path: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    else:  # a real PNG cut short
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (9, 9, 9)).save(buf, format="PNG")
        path.write_bytes(buf.getvalue()[:60])
    return path


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def folder(tmp_path) -> ImageFolder:
    for name, color in COLORS.items():
        for j in range(2):
            png(tmp_path / "folder" / name / f"{j}.png", color, size=(10 + j, 8))
    return ImageFolder(tmp_path / "folder")


@pytest.fixture
def fmnist(tmp_path) -> FashionMNIST:
    root = tmp_path / "fm"
    root.mkdir()
    n = 40
    images = np.broadcast_to(np.arange(n)[:, None, None] * 6, (n, 28, 28))
    write_idx(root / "train-images-idx3-ubyte.gz", images)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return FashionMNIST(root)


@pytest.fixture
def manifest(tmp_path) -> Manifest:
    d = tmp_path / "pairs"
    rows = []
    for j in range(5):
        png(d / f"{j}.png", (j * 40, j * 40, 0))
        rows.append({"path": f"{j}.png", "caption": f"pair {j % 3}"})
    (d / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return Manifest(d / "m.jsonl")


def collect(mixture, num_workers=0):
    loader = DataLoader(mixture, batch_size=None, num_workers=num_workers)
    return list(loader)


def same(a, b) -> bool:
    return (
        a.step == b.step
        and torch.equal(a.images, b.images)
        and torch.equal(a.labels, b.labels)
        and torch.equal(a.source, b.source)
        and torch.equal(a.index, b.index)
        and a.captions == b.captions
        and a.n_skipped == b.n_skipped
    )


def test_batch_format_and_class_offsets(folder, fmnist, manifest):
    mix = Mixture([folder, fmnist, manifest], [1, 1, 1], batch_size=48, image_size=16, seed=1)
    assert mix.class_offsets == [0, 3, None]
    assert mix.class_names == ["a", "b", "c"] + FASHION_MNIST_CLASSES and mix.num_classes == 13
    assert list(mix.class_range(1)) == list(range(3, 13)) and list(mix.class_range(2)) == []
    b = mix.batch(0)
    assert isinstance(b, Batch) and b.crops is None and b.drawn is None  # made into views on the device
    assert b.images.dtype == torch.uint8 and b.images.shape == (48, 3, 16, 16)
    assert b.labels.dtype == torch.long and b.source.dtype == torch.long
    assert len(b.captions) == 48 and b.step == 0 and b.n_skipped == 0
    src, lab = b.source, b.labels
    assert set(src.tolist()) == {0, 1, 2}
    assert ((lab[src == 0] >= 0) & (lab[src == 0] < 3)).all()
    assert ((lab[src == 1] >= 3) & (lab[src == 1] < 13)).all()
    assert (lab[src == 2] == -1).all()
    for j in range(48):
        if src[j] == 0:  # the pixel colour is the folder's class
            name = mix.class_names[lab[j]]
            assert tuple(b.images[j, :, 4, 4].tolist()) == COLORS[name]
            assert b.captions[j] is None
        if src[j] == 2:
            assert b.captions[j].startswith("pair ")
    assert mix.captions() == ["pair 0", "pair 1", "pair 2"]


def test_weights_are_honoured(folder, fmnist, manifest):
    w = [0.6, 0.3, 0.1, 0.0]
    mix = Mixture([fmnist, folder, manifest, ImageFolder(folder.root, labels=False)], w,
                  batch_size=64, image_size=8, seed=7, num_steps=30)
    counts = np.zeros(4)
    for b in mix:
        counts += np.bincount(b.source.numpy(), minlength=4)
    freq = counts / counts.sum()
    assert counts.sum() == 64 * 30
    assert np.abs(freq - np.array(w)).max() < 0.04, freq
    assert counts[3] == 0


def test_determinism_and_resume(folder, fmnist, manifest):
    def make(**kw):
        return Mixture([folder, fmnist, manifest], [2, 1, 1], batch_size=8, image_size=12, num_steps=6, **kw)

    full = collect(make(seed=5))
    assert [b.step for b in full] == list(range(6))
    again = collect(make(seed=5))
    assert all(same(x, y) for x, y in zip(full, again))
    resumed = make(seed=5)
    resumed.start_step = 3
    assert len(resumed) == 3
    tail = collect(resumed)
    assert [b.step for b in tail] == [3, 4, 5]
    assert all(same(x, y) for x, y in zip(full[3:], tail))
    assert same(make(seed=5).batch(4), full[4])
    assert not torch.equal(collect(make(seed=6))[0].images, full[0].images)
    other_rank = make(seed=5, rank=1, world_size=2).batch(0)
    assert not torch.equal(other_rank.images, full[0].images)


def cat(batches: list[Batch]) -> Batch:
    """The rank batches of one step joined in rank order."""
    return Batch(torch.cat([b.labels for b in batches]), sum((b.captions for b in batches), []),
                 torch.cat([b.images for b in batches]), source=torch.cat([b.source for b in batches]),
                 index=torch.cat([b.index for b in batches]), step=batches[0].step,
                 n_skipped=sum(b.n_skipped for b in batches))


def test_the_global_batch_is_the_same_on_any_world_size(folder, fmnist, manifest):
    def make(rank, world):
        return Mixture([folder, fmnist, manifest], [2, 1, 1], batch_size=12 // world, image_size=8, seed=3,
                       rank=rank, world_size=world)

    for step in (0, 1, 7):
        one = make(0, 1).batch(step)
        for world in (2, 3, 4):
            assert same(cat([make(r, world).batch(step) for r in range(world)]), one), (step, world)
        ks, idx = make(0, 1).global_plan(step)  # what the batch reads is its plan
        assert torch.equal(one.source, torch.as_tensor(ks)) and torch.equal(one.index, torch.as_tensor(idx))


class Flaky(ImageFolder):
    """A real folder whose reads fail: ``transient[i]`` times for sample ``i`` (then it reads),
    always for the samples in ``broken`` (with ReadFailed), and as undecodable for ``corrupt``."""

    def __init__(self, root, transient=None, broken=(), corrupt=()):
        super().__init__(root)
        self.transient, self.broken, self.corrupt = dict(transient or {}), set(broken), set(corrupt)
        self.reads: list[int] = []

    def _image(self, i, draft):
        self.reads.append(i)
        if self.transient.get(i, 0) > 0:
            self.transient[i] -= 1
            raise ReadFailed(f"{self.paths[i]}: Input/output error (injected)")
        if i in self.broken:
            raise ReadFailed(f"{self.paths[i]}: Stale file handle (injected)")
        if i in self.corrupt:
            raise OSError(f"{self.paths[i]}: cannot identify image file (injected)")
        return super()._image(i, draft)


def flaky_folder(tmp_path, n=40):
    for j in range(n):
        png(tmp_path / "flaky" / f"{j:03d}.png", (j * 6, 255 - j * 6, j), size=(9, 9))
    return tmp_path / "flaky"


def test_read_failures_change_only_the_failing_slots(tmp_path):
    root = flaky_folder(tmp_path)
    steps, B, n = 6, 16, 40

    def run(src, start=0, workers=0, sleeps=None):
        mix = Mixture([src], None, batch_size=B, image_size=4, seed=11, start_step=start, num_steps=steps,
                      read_retries=2, retry_backoff=0.5)
        mix.sleep = sleeps.append if sleeps is not None else (lambda s: None)
        return mix, collect(mix, workers)

    mix, clean = run(Flaky(root))
    planned = np.concatenate([mix.plan(s)[1] for s in range(steps)])
    assert np.array_equal(np.concatenate([b.index for b in clean]), planned)
    used = list(dict.fromkeys(planned.tolist()))  # in order of first use
    broken, corrupt, transient = {used[0], used[1]}, {used[2]}, used[3]
    failing = broken | corrupt

    def flaky():
        return Flaky(root, transient={transient: 2}, broken=broken, corrupt=corrupt)

    sleeps: list[float] = []
    src = flaky()
    _, got = run(src, sleeps=sleeps)
    replaced = broken_reads = skipped = 0
    for s, (a, b) in enumerate(zip(clean, got)):
        for j in range(B):
            i = int(a.index[j])
            if i not in failing:  # every other slot reads exactly what the clean run read
                assert int(b.index[j]) == i and torch.equal(b.images[j], a.images[j]), (s, j)
                continue
            # the slot alone is replaced: the first readable index of its own stream
            replaced += 1
            g, tried = mix.slot_rng(s, j), [i]
            while tried[-1] in failing:
                tried.append(int(g.integers(n)))
            assert int(b.index[j]) == tried[-1] and torch.equal(b.images[j], clean_image(clean, tried[-1]))
            broken_reads += sum(x in broken for x in tried)
            skipped += len(tried) - 1
    assert replaced >= 3
    assert sum(b.n_replaced for b in got) == replaced and sum(b.n_skipped for b in got) == skipped
    # ReadFailed is tried again read_retries times: the transient sample is then read (nothing
    # changes), a broken one replaced; undecodable bytes are not tried again
    assert sum(b.n_retries for b in got) == 2 + 2 * broken_reads
    assert sleeps[:2] == [0.5, 1.0] and len(sleeps) == 2 + 2 * broken_reads
    assert src.reads.count(used[2]) == skipped - broken_reads

    # a resumed run, and one through DataLoader workers, continue the same batches
    _, tail = run(flaky(), start=3)
    _, parallel = run(flaky(), workers=2)
    for a, b in zip(got[3:], tail):
        assert same(a, b)
    for a, b in zip(got, parallel):
        assert torch.equal(a.images, b.images) and torch.equal(a.index, b.index)


def clean_image(batches, i):
    for b in batches:
        hit = torch.nonzero(b.index == i)
        if len(hit):
            return b.images[int(hit[0])]
    raise AssertionError(f"sample {i} never drawn in the clean run")


def test_worker_count_does_not_change_batches(folder, fmnist, manifest):
    mix = Mixture([folder, fmnist, manifest], [1, 1, 1], batch_size=8, image_size=12, seed=2,
                  start_step=10, num_steps=17)
    serial = collect(mix, num_workers=0)
    parallel = collect(mix, num_workers=2)
    assert [b.step for b in parallel] == list(range(10, 17))
    assert len(serial) == len(parallel) == 7
    assert all(same(x, y) for x, y in zip(serial, parallel))


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = tmp_path / "mixed"
    png(root / "good1.png", (200, 10, 10))
    png(root / "good2.png", (200, 10, 10))
    corrupt(root / "bad1.png", "garbage")
    corrupt(root / "bad2.png", "truncated")
    src = ImageFolder(root)
    mix = Mixture([src], None, batch_size=16, image_size=8, seed=0, num_steps=4)
    batches = list(mix)
    skipped = sum(b.n_skipped for b in batches)
    assert skipped > 0
    assert all((b.images[:, 0] == 200).all() for b in batches)  # only good images made it
    assert [b.n_skipped for b in batches] == [b.n_skipped for b in mix]  # deterministic


def test_missing_manifest_file_is_skipped(tmp_path):
    png(tmp_path / "ok.png", (5, 5, 5))
    (tmp_path / "m.jsonl").write_text('{"path": "ok.png", "caption": "ok"}\n{"path": "gone.png", "caption": "gone"}\n')
    mix = Mixture([Manifest(tmp_path / "m.jsonl")], [1], batch_size=16, image_size=4)
    b = mix.batch(0)
    assert b.n_skipped > 0 and b.captions == ["ok"] * 16


def test_only_corrupt_images_raise(tmp_path):
    corrupt(tmp_path / "bad" / "x.png", "garbage")
    corrupt(tmp_path / "bad" / "y.png", "truncated")
    src = ImageFolder(tmp_path / "bad")
    mix = Mixture([src], [1], batch_size=2, image_size=8, max_failures=20)
    with pytest.raises(SourceUnreadableError, match=r"folder:.*bad.*20 unreadable.*bad/[xy]\.png"):
        mix.batch(0)


def test_shards_in_mixture(tmp_path):
    import webdataset as wds

    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"{s:06d}.tar")) as w:
            for k in range(3):
                buf = io.BytesIO()
                Image.new("RGB", (9, 9), (k, s, 0)).save(buf, format="PNG")
                w.write({"__key__": f"s{s}k{k}", "png": buf.getvalue(), "txt": f"shard {s} key {k}"})
    mix = Mixture([Shards(str(tmp_path / "*.tar"))], [1], batch_size=12, image_size=4)
    b = mix.batch(3)
    for j, cap in enumerate(b.captions):
        s, k = int(cap.split()[1]), int(cap.split()[3])
        assert tuple(b.images[j, :, 0, 0].tolist()) == (k, s, 0)
    assert (b.labels == -1).all() and mix.num_classes == 0
    assert len(mix.captions()) == 6


def test_argument_errors(folder):
    with pytest.raises(ValueError, match="2 weights for 1 sources"):
        Mixture([folder], [1, 2], batch_size=2, image_size=8)
    with pytest.raises(ValueError, match="weights"):
        Mixture([folder], [-1], batch_size=2, image_size=8)
    with pytest.raises(ValueError, match="rank"):
        Mixture([folder], [1], batch_size=2, image_size=8, rank=2, world_size=2)
    with pytest.raises(TypeError):
        len(Mixture([folder], [1], batch_size=2, image_size=8))


REAL = (data_root() / "emoji" / "emoji.json").is_file() and any(
    (p / "train-images-idx3-ubyte.gz").is_file()
    for p in (data_root() / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist"))
)


@pytest.mark.skipif(not REAL, reason="built-in sets not installed (run `m3i data fetch`)")
def test_real_builtin_mix():
    fm = FashionMNIST(split="test")
    mix = Mixture([fm, Emoji(), FashionMNIST(split="test", labels=False)], [0.5, 0.3, 0.2],
                  batch_size=32, image_size=32, seed=0)
    assert mix.num_classes == 20 and mix.class_offsets == [0, 10, None]
    b = mix.batch(0)
    assert b.images.shape == (32, 3, 32, 32) and b.n_skipped == 0
    emoji = b.source == 1
    assert all(isinstance(b.captions[j], str) for j in torch.nonzero(emoji).flatten().tolist())
    assert ((b.labels[emoji] >= 10) & (b.labels[emoji] < 20)).all()
    # the emoji source is the train part (m3i.data.splits): its distinct captions, no more
    assert len(mix.captions()) == len(set(Emoji().all_captions())) > 1500
