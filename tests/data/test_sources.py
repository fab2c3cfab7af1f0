"""Sources on small real-format data written here, and on the built-in sets where installed."""

from __future__ import annotations

import csv
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m3i.data import (
    FASHION_MNIST_CLASSES,
    Emoji,
    FashionMNIST,
    ImageFolder,
    Manifest,
    Shards,
    build_source,
    data_root,
    read_idx,
)
from m3i.data import index as index_mod


def png(path: Path, color, size=(6, 5), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def png_bytes(color, size=(6, 5)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def write_shards(folder: Path, n_per_shard=(3, 4)) -> list[Path]:
    import webdataset as wds

    paths, k = [], 0
    for s, n in enumerate(n_per_shard):
        p = folder / f"{s:06d}.tar"
        with wds.TarWriter(str(p)) as w:
            for _ in range(n):
                w.write({"__key__": f"{k:09d}", "png": png_bytes((k * 20, 0, 0)),
                         "txt": f"caption number {k}", "cls": str(k % 3)})
                k += 1
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------ ImageFolder


def test_folder_labels_from_subfolders(tmp_path):
    png(tmp_path / "zebra" / "a.png", (0, 0, 255))
    png(tmp_path / "ant" / "x.PNG", (255, 0, 0))
    png(tmp_path / "ant" / "nested" / "y.jpg", (250, 0, 0))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    src = ImageFolder(tmp_path)
    assert src.class_names == ["ant", "zebra"] and src.num_classes == 2
    assert len(src) == 3
    got = [src.get(i) for i in range(len(src))]
    assert [g["label"] for g in got] == [0, 0, 1]
    assert all(g["image"].mode == "RGB" and g["caption"] is None for g in got)
    assert got[2]["image"].getpixel((0, 0)) == (0, 0, 255)
    hidden = ImageFolder(tmp_path, labels=False)
    assert hidden.num_classes == 0 and hidden.class_names == [] and hidden.get(0)["label"] == -1


def test_flat_folder_has_no_labels(tmp_path):
    png(tmp_path / "a.png", (1, 2, 3))
    png(tmp_path / "sub" / "b.webp", (4, 5, 6))
    src = ImageFolder(tmp_path)
    assert len(src) == 2 and src.num_classes == 0 and src.get(1)["label"] == -1


def test_rgba_is_composited_on_white(tmp_path):
    png(tmp_path / "t.png", (255, 0, 0, 0), mode="RGBA")
    assert ImageFolder(tmp_path).get(0)["image"].getpixel((0, 0)) == (255, 255, 255)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no usable sample"):
        ImageFolder(tmp_path / "d")


# ------------------------------------------------------------------------------ Manifest


def test_jsonl_manifest(tmp_path):
    png(tmp_path / "img" / "a.png", (10, 10, 10))
    absolute = png(tmp_path / "elsewhere" / "b.png", (20, 20, 20))
    rows = [{"path": "img/a.png", "caption": "a grey square", "label": 2},
            {"path": str(absolute), "caption": "another", "label": 0},
            {"path": "img/a.png", "caption": ""}]
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with pytest.warns(UserWarning, match="1 of 3 rows have an empty caption"):
        src = Manifest(m)
    assert len(src) == 3 and src.num_classes == 3
    assert src.get(0)["caption"] == "a grey square" and src.get(0)["label"] == 2
    assert src.get(1)["image"].getpixel((0, 0)) == (20, 20, 20)
    assert src.get(2) == {"image": src.get(2)["image"], "label": -1, "caption": None}
    assert src.all_captions() == ["a grey square", "another"]
    assert Manifest(m, captions=False).get(0)["caption"] is None


def test_csv_manifest(tmp_path):
    png(tmp_path / "a.png", (1, 1, 1))
    m = tmp_path / "m.csv"
    with open(m, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerow(["a.png", "one, with a comma"])
        w.writerow(["a.png", "two"])
    src = Manifest(m)
    assert [src.get(i)["caption"] for i in range(2)] == ["one, with a comma", "two"]
    assert src.num_classes == 0 and src.get(0)["label"] == -1


def test_manifest_bad_rows_are_dropped_and_counted_naming_file_line_field(tmp_path):
    m = tmp_path / "bad.jsonl"
    m.write_text('{"path": "a.png", "caption": "x"}\n\n{"caption": "no path"}\n')
    with pytest.warns(UserWarning, match=r"1 of 2 rows dropped \(first: .*bad\.jsonl:3: missing field 'path'"):
        src = Manifest(m)
    assert len(src) == 1 and src.num_dropped == 1
    # a manifest with no usable row names the first reason
    m.write_text('{"path": "a.png"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: missing field 'caption'"):
        Manifest(m)
    m.write_text('{"path": "a.png", "caption": "x", "label": 1.5}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'label'"):
        Manifest(m)
    m.write_text('{"path": "a.png", "caption": "x"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: invalid JSON"):
        Manifest(m)
    c = tmp_path / "bad.csv"
    c.write_text("path,caption\na.png,ok\nb.png\n")
    with pytest.warns(UserWarning, match=r"bad\.csv:3: missing field 'caption'"):
        assert len(Manifest(c)) == 1
    c.write_text("path,label\na.png,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv:1: missing field 'caption'"):
        Manifest(c)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        Manifest(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no usable sample"):
        Manifest(tmp_path / "empty.jsonl")


# ------------------------------------------------------------------------------ Shards


def test_shards_random_access(tmp_path):
    write_shards(tmp_path)
    src = Shards(str(tmp_path / "{000000..000001}.tar"))
    assert len(src) == 7 and src.num_classes == 3
    for key in ("000000005", "000000001", "000000003"):
        i = src.find(key)
        k = int(key)
        s = src.get(i)
        assert src.key(i) == key
        assert s["caption"] == f"caption number {k}" and s["label"] == k % 3
        assert s["image"].getpixel((0, 0)) == (k * 20, 0, 0)
    assert src.locate(src.find("000000005")).endswith("000001.tar:000000005.png")
    assert len(Shards(str(tmp_path / "*.tar"))) == 7
    assert src.all_captions()[:2] == ["caption number 0", "caption number 1"]


def test_shard_index_is_built_once(tmp_path, monkeypatch):
    (p,) = write_shards(tmp_path, (2,))
    Shards(str(p))
    calls = []
    real = index_mod.scan_shard
    monkeypatch.setattr(index_mod, "scan_shard", lambda path: calls.append(path) or real(path))
    again = Shards([str(p)], labels=False, captions=False)
    assert calls == []
    assert again.get(1) == {"image": again.get(1)["image"], "label": -1, "caption": None}


def test_shards_stream_matches_random_access(tmp_path):
    write_shards(tmp_path)
    src = Shards(str(tmp_path / "*.tar"))
    streamed = list(src.stream())
    assert [s["key"] for s in streamed] == [src.key(i) for i in range(len(src))]
    for i, s in enumerate(streamed):
        ref = src.get(i)
        assert (s["caption"], s["label"]) == (ref["caption"], ref["label"])
        assert s["image"].tobytes() == ref["image"].tobytes()


def test_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="000000.tar"):
        Shards(str(tmp_path / "000000.tar"))
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        Shards(str(tmp_path / "*.tar"))


# ------------------------------------------------------------------------------ Fashion-MNIST


def fake_fashion_mnist(root: Path, n=5) -> np.ndarray:
    root.mkdir(parents=True, exist_ok=True)
    images = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28) % 256
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return images


def test_fashion_mnist_from_idx(tmp_path):
    images = fake_fashion_mnist(tmp_path / "fm")
    src = FashionMNIST(tmp_path / "fm", split="test")
    assert len(src) == 5 and src.class_names == FASHION_MNIST_CLASSES
    s = src.get(3)
    assert s["label"] == 3 and s["caption"] is None and s["image"].mode == "RGB"
    arr = np.asarray(s["image"])
    assert arr.shape == (28, 28, 3) and (arr[..., 0] == images[3]).all() and (arr[..., 2] == images[3]).all()
    assert read_idx(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").tolist() == [0, 1, 2, 3, 4]
    unlabelled = FashionMNIST(tmp_path / "fm", labels=False)
    assert unlabelled.num_classes == 0 and unlabelled.get(0)["label"] == -1


def test_fashion_mnist_default_root_and_errors(tmp_path, monkeypatch):
    fake_fashion_mnist(tmp_path / "fashion-mnist")
    monkeypatch.setenv("M3I_DATA", str(tmp_path))
    assert data_root() == tmp_path
    assert len(FashionMNIST()) == 5
    with pytest.raises(FileNotFoundError, match="`m3i data fetch`"):
        FashionMNIST(tmp_path / "missing")
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(tmp_path / "fashion-mnist", split="dev")


REAL_FM = [data_root() / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]


@pytest.mark.skipif(not any((p / "t10k-images-idx3-ubyte.gz").is_file() for p in REAL_FM),
                    reason="Fashion-MNIST not installed (run `m3i data fetch`)")
def test_real_fashion_mnist():
    src = FashionMNIST(split="test")
    assert len(src) == 10_000 and src.num_classes == 10
    s = src.get(0)
    assert s["image"].size == (28, 28) and 0 <= s["label"] < 10
    assert np.bincount(src.targets, minlength=10).tolist() == [1000] * 10


# ------------------------------------------------------------------------------ Emoji


def fake_emoji(root: Path) -> None:
    d = root / "img" / "google" / "64"
    d.mkdir(parents=True)
    entries = [
        {"name": "GRINNING FACE", "image": "1f600.png", "category": "Smileys & Emotion",
         "subcategory": "face-smiling", "sort_order": 2, "has_img_google": True,
         "skin_variations": {"1F3FB": {"image": "1f600-1f3fb.png", "has_img_google": True}}},
        {"name": "CROSSED SWORDS", "image": "2694.png", "category": "Objects",
         "subcategory": "tool", "sort_order": 1, "has_img_google": True},
        {"name": "NO GOOGLE IMAGE", "image": "ffff.png", "category": "Objects",
         "subcategory": "tool", "sort_order": 3, "has_img_google": False},
    ]
    (root / "emoji.json").write_text(json.dumps(entries))
    png(d / "1f600.png", (0, 0, 0, 0), size=(64, 64), mode="RGBA")
    png(d / "2694.png", (0, 128, 0, 255), size=(64, 64), mode="RGBA")


def test_emoji_from_package_layout(tmp_path):
    fake_emoji(tmp_path)
    src = Emoji(tmp_path)
    assert len(src) == 2 and src.class_names == ["Objects", "Smileys & Emotion"]
    first, second = src.get(0), src.get(1)
    assert first["caption"] == "crossed swords" and first["label"] == 0
    assert second["caption"] == "grinning face" and second["label"] == 1
    assert second["image"].getpixel((5, 5)) == (255, 255, 255)  # transparent → white
    assert first["image"].getpixel((5, 5)) == (0, 128, 0)
    assert Emoji(tmp_path, label="subcategory").class_names == ["face-smiling", "tool"]
    plain = Emoji(tmp_path, label=None, caption=False)
    assert plain.num_classes == 0 and plain.get(0)["caption"] is None and plain.all_captions() == []
    with pytest.raises(FileNotFoundError, match="emoji-datasource-google"):
        Emoji(tmp_path / "missing")


@pytest.mark.skipif(not (data_root() / "emoji" / "emoji.json").is_file(),
                    reason="emoji not installed in the m3i cache (run `m3i data fetch`)")
def test_real_emoji():
    src, test = Emoji(), Emoji(split="test")
    assert len(src) + len(test) == 1911 and src.num_classes == test.num_classes == 10
    assert 0.19 < len(test) / 1911 < 0.21
    assert Emoji(label="subcategory").num_classes == 99
    s = src.get(0)
    assert s["image"].size == (64, 64) and s["image"].mode == "RGB" and s["caption"] == s["caption"].lower()
    assert "crossed swords" in src.all_captions()


# ------------------------------------------------------------------------------ specs


def test_builtin_specs(tmp_path, monkeypatch):
    fake_fashion_mnist(tmp_path / "fashion-mnist")
    fake_emoji(tmp_path / "emoji")
    png(tmp_path / "imgs" / "c" / "a.png", (0, 0, 0))
    monkeypatch.setenv("M3I_DATA", str(tmp_path))
    assert build_source("fashion-mnist").name == "fashion-mnist:train"
    assert build_source("fashion-mnist:test?labels=false").num_classes == 0
    assert build_source("emoji:subcategory").num_classes == 2
    e = build_source("emoji?captions=0&labels=0")
    assert e.num_classes == 0 and not e.has_captions
    assert build_source("emoji", captions=False).get(0)["caption"] is None
    assert build_source(f"folder:{tmp_path / 'imgs'}").class_names == ["c"]
    with pytest.raises(ValueError, match=r"accepted forms: fashion-mnist\[:train\|test\|fit\|val\]"):
        build_source("imagenet:/data")
    with pytest.raises(ValueError, match="split"):
        build_source("fashion-mnist:dev")
    with pytest.raises(ValueError, match="emoji takes a label"):
        build_source("emoji:category:dev")
    assert build_source("emoji:subcategory:train").name == "emoji:subcategory:train"


# ------------------------------------------------------------------------------ digits


def test_digits_from_the_csv(tmp_path, monkeypatch):
    rows = np.zeros((20, 65))
    rows[:, 0] = 16  # the top-left pixel at full intensity
    rows[:, 64] = np.arange(20) % 10
    (tmp_path / "digits").mkdir()
    with gzip.open(tmp_path / "digits" / "digits.csv.gz", "wt") as f:
        np.savetxt(f, rows, delimiter=",", fmt="%d")
    monkeypatch.setenv("M3I_DATA", str(tmp_path))
    train, test = build_source("digits"), build_source("digits:test")
    assert len(train) + len(test) == 20 and len(test) == 4 and train.num_classes == 10
    img = train.get(0)["image"]
    assert img.size == (8, 8) and img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (0, 0, 0)
    assert not {train.locate(i) for i in range(len(train))} & {test.locate(i) for i in range(len(test))}
    with gzip.open(tmp_path / "digits" / "digits.csv.gz", "wt") as f:
        np.savetxt(f, rows[:, :10], delimiter=",", fmt="%d")
    with pytest.raises(ValueError, match="64 pixel values and a label"):
        build_source("digits")
