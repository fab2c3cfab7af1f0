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
        a["step"] == b["step"]
        and torch.equal(a["image"], b["image"])
        and torch.equal(a["label"], b["label"])
        and torch.equal(a["source"], b["source"])
        and a["caption"] == b["caption"]
        and a["n_skipped"] == b["n_skipped"]
    )


def test_batch_format_and_class_offsets(folder, fmnist, manifest):
    mix = Mixture([folder, fmnist, manifest], [1, 1, 1], batch_size=48, image_size=16, seed=1)
    assert mix.class_offsets == [0, 3, None]
    assert mix.class_names == ["a", "b", "c"] + FASHION_MNIST_CLASSES and mix.num_classes == 13
    assert list(mix.class_range(1)) == list(range(3, 13)) and list(mix.class_range(2)) == []
    b = mix.batch(0)
    assert set(b) == {"image", "label", "caption", "source", "step", "n_skipped"}
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (48, 3, 16, 16)
    assert b["label"].dtype == torch.long and b["source"].dtype == torch.long
    assert len(b["caption"]) == 48 and b["step"] == 0 and b["n_skipped"] == 0
    src, lab = b["source"], b["label"]
    assert set(src.tolist()) == {0, 1, 2}
    assert ((lab[src == 0] >= 0) & (lab[src == 0] < 3)).all()
    assert ((lab[src == 1] >= 3) & (lab[src == 1] < 13)).all()
    assert (lab[src == 2] == -1).all()
    for j in range(48):
        if src[j] == 0:  # the pixel colour is the folder's class
            name = mix.class_names[lab[j]]
            assert tuple(b["image"][j, :, 4, 4].tolist()) == COLORS[name]
            assert b["caption"][j] is None
        if src[j] == 2:
            assert b["caption"][j].startswith("pair ")
    assert mix.captions() == ["pair 0", "pair 1", "pair 2"]


def test_weights_are_honoured(folder, fmnist, manifest):
    w = [0.6, 0.3, 0.1, 0.0]
    mix = Mixture([fmnist, folder, manifest, ImageFolder(folder.root, labels=False)], w,
                  batch_size=64, image_size=8, seed=7, num_steps=30)
    counts = np.zeros(4)
    for b in mix:
        counts += np.bincount(b["source"].numpy(), minlength=4)
    freq = counts / counts.sum()
    assert counts.sum() == 64 * 30
    assert np.abs(freq - np.array(w)).max() < 0.04, freq
    assert counts[3] == 0


def test_determinism_and_resume(folder, fmnist, manifest):
    def make(**kw):
        return Mixture([folder, fmnist, manifest], [2, 1, 1], batch_size=8, image_size=12, num_steps=6, **kw)

    full = collect(make(seed=5))
    assert [b["step"] for b in full] == list(range(6))
    again = collect(make(seed=5))
    assert all(same(x, y) for x, y in zip(full, again))
    resumed = make(seed=5)
    resumed.start_step = 3
    assert len(resumed) == 3
    tail = collect(resumed)
    assert [b["step"] for b in tail] == [3, 4, 5]
    assert all(same(x, y) for x, y in zip(full[3:], tail))
    assert same(make(seed=5).batch(4), full[4])
    assert not torch.equal(collect(make(seed=6))[0]["image"], full[0]["image"])
    other_rank = make(seed=5, rank=1, world_size=2).batch(0)
    assert not torch.equal(other_rank["image"], full[0]["image"])


def test_worker_count_does_not_change_batches(folder, fmnist, manifest):
    mix = Mixture([folder, fmnist, manifest], [1, 1, 1], batch_size=8, image_size=12, seed=2,
                  start_step=10, num_steps=17)
    serial = collect(mix, num_workers=0)
    parallel = collect(mix, num_workers=2)
    assert [b["step"] for b in parallel] == list(range(10, 17))
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
    skipped = sum(b["n_skipped"] for b in batches)
    assert skipped > 0
    assert all((b["image"][:, 0] == 200).all() for b in batches)  # only good images made it
    assert [b["n_skipped"] for b in batches] == [b["n_skipped"] for b in mix]  # deterministic


def test_missing_manifest_file_is_skipped(tmp_path):
    png(tmp_path / "ok.png", (5, 5, 5))
    (tmp_path / "m.jsonl").write_text('{"path": "ok.png", "caption": "ok"}\n{"path": "gone.png", "caption": "gone"}\n')
    mix = Mixture([Manifest(tmp_path / "m.jsonl")], [1], batch_size=16, image_size=4)
    b = mix.batch(0)
    assert b["n_skipped"] > 0 and b["caption"] == ["ok"] * 16


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
    for j, cap in enumerate(b["caption"]):
        s, k = int(cap.split()[1]), int(cap.split()[3])
        assert tuple(b["image"][j, :, 0, 0].tolist()) == (k, s, 0)
    assert (b["label"] == -1).all() and mix.num_classes == 0
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


@pytest.mark.skipif(not REAL, reason="built-in sets not installed (run scripts/fetch_data.sh)")
def test_real_builtin_mix():
    fm = FashionMNIST(split="test")
    mix = Mixture([fm, Emoji(), FashionMNIST(split="test", labels=False)], [0.5, 0.3, 0.2],
                  batch_size=32, image_size=32, seed=0)
    assert mix.num_classes == 20 and mix.class_offsets == [0, 10, None]
    b = mix.batch(0)
    assert b["image"].shape == (32, 3, 32, 32) and b["n_skipped"] == 0
    emoji = b["source"] == 1
    assert all(isinstance(b["caption"][j], str) for j in torch.nonzero(emoji).flatten().tolist())
    assert ((b["label"][emoji] >= 10) & (b["label"][emoji] < 20)).all()
    # the emoji source is the train part (m3i.data.splits): its distinct captions, no more
    assert len(mix.captions()) == len(set(Emoji().all_captions())) > 1500
