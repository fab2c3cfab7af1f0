"""Damaged data, every format, through the command line: each damaged shard, file or image is
counted, named and said what is wrong with it (`m3i data index`, `m3i data info`, `m3i eval`),
never dropped in silence; a set with nothing usable is one line and exit 2."""
from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import HANG
from m3i.cli import main

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
G = np.random.default_rng(0)


def encode(fmt: str, seed: int = 0, size: int = 8) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(b, fmt)
    return b.getvalue()


def write_shard(path: Path, images: list[bytes], ext: str = "png") -> Path:
    """One sample per image: KEY.ext + KEY.txt, keys 000000, 000001, ..."""
    with tarfile.open(path, "w") as tf:
        for k, data in enumerate(images):
            for name, blob in ((f"{k:06d}.{ext}", data), (f"{k:06d}.txt", f"caption {k}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    return path


def cut_inside(path: Path, member: str) -> Path:
    """The shard cut 10 bytes into ``member``'s data."""
    with tarfile.open(path) as tf:
        at = tf.getmember(member).offset_data + 10
    path.write_bytes(path.read_bytes()[:at])
    return path


def damaged_set(root: Path) -> dict[str, str]:
    """4 shards: one whole (6 samples), and 3 damaged -> what each should be said to be."""
    root.mkdir(parents=True, exist_ok=True)
    write_shard(root / "000000.tar", [encode("PNG", k) for k in range(6)])
    (root / "000001.tar").write_bytes(G.integers(0, 256, 8192, dtype=np.uint8).tobytes())
    (root / "000002.tar").write_bytes(b"")
    cut_inside(write_shard(root / "000003.tar", [encode("PNG", k) for k in range(6)]), "000004.png")
    return {"000001.tar": "not a tar file (no tar header at its start)", "000002.tar": "empty file (0 bytes)",
            "000003.tar": "truncated: the file ends inside 000004.png"}


# -- shard sets ----------------------------------------------------------------------------------
def test_index_names_every_damaged_shard_and_what_is_wrong(tmp_path, capsys):
    expected = damaged_set(tmp_path)
    assert main(["data", "index", str(tmp_path / "*.tar"), "--processes", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "10 samples in 4 shards" in out[0]  # 6 whole + the 4 before the cut
    assert out[1] == "damaged: 3 of 4 shards; their whole samples are used, the rest is lost"
    for line, (name, why) in zip(out[2:], expected.items()):
        assert line.startswith(f"  {tmp_path / name}: {why}"), line
    assert len(out) == 5

    assert main(["data", "info", f"shards:{tmp_path}/*.tar", "--json"]) == 0
    out, err = capsys.readouterr()
    assert f"m3i: warning: 3 of 4 shards are damaged (first: {tmp_path / '000001.tar'}: not a tar file" in err
    info = json.loads(out)
    assert info["samples"] == 10 and info["broken"]["damaged shards"] == 3
    assert [Path(d["path"]).name for d in info["damaged"]] == list(expected)
    assert all(d["damage"].startswith(expected[Path(d["path"]).name]) for d in info["damaged"])
    # what the damaged shards lost counts against data.max_lost: an intact shard holds 6 samples
    assert info["dropped"] == 6 + 6 + 2


@pytest.mark.parametrize("content, why", [
    (b"", "empty file (0 bytes)"),
    (G.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a tar file (no tar header at its start)"),
    (gzip.compress(b"\0" * 2048), "gzip-compressed, not a plain tar"),
])
def test_a_shard_set_with_no_usable_sample_is_one_line(tmp_path, capsys, content, why):
    shard = tmp_path / "000000.tar"
    shard.write_bytes(content)
    assert main(["data", "index", str(shard), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"m3i data: error: no usable sample in 1 shard(s): 1 damaged (first: {shard}: {why}")
    assert main(["data", "info", f"shards:{shard}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"m3i data: error: source 'shards:{shard}': no usable sample in 1 shard(s)") and why in err


def test_info_counts_and_names_image_members_that_do_not_decode(tmp_path, capsys):
    good, jpeg = encode("PNG"), encode("JPEG", size=32)
    bad = {1: (G.integers(0, 256, 300, dtype=np.uint8).tobytes(), "not an image"),
           4: (jpeg[: len(jpeg) // 2], "truncated JPEG file"),
           6: (b"", "empty file (0 bytes)"),
           9: (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "corrupt PNG")}
    images = [bad[k][0] if k in bad else good for k in range(20)]
    shards = [write_shard(tmp_path / "000000.tar", images, "jpg"), write_shard(tmp_path / "000001.tar", [good] * 5)]
    assert main(["data", "info", f"shards:{tmp_path}/*.tar", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["broken"]["unreadable images"] == 4 and info["images"]["checked"] == 25
    (where,) = info["images"]["where"]  # the whole shard is not listed
    assert (where["where"], where["broken"], where["images"]) == (str(shards[0]), 4, 20)
    assert [f.split(":")[0] for f in where["first"]] == ["000001.jpg", "000004.jpg", "000006.jpg"]  # the first 3
    for line, k in zip(where["first"], (1, 4, 6)):
        assert line.startswith(f"{k:06d}.jpg: {bad[k][1]}"), line
    assert main(["data", "info", f"shards:{tmp_path}/*.tar"]) == 0
    text = capsys.readouterr().out
    assert f"{shards[0]}: 4 of 20 images unreadable (first: 000001.jpg: not an image" in text
    assert "unreadable images 4" in text


def test_decode_finds_damage_whose_file_ends_look_right(tmp_path, capsys):
    """A PNG whose image data is garbled but whose start and IEND are whole passes the cheap look
    at its ends; --decode decodes every image and finds it."""
    png = encode("PNG", size=16)
    idat = png.index(b"IDAT") + 4
    garbled = png[:idat] + bytes(b ^ 0xFF for b in png[idat:idat + 40]) + png[idat + 40:]
    images = [encode("PNG", k) for k in range(300)]
    images[137] = garbled
    write_shard(tmp_path / "000000.tar", images)
    assert main(["data", "info", f"shards:{tmp_path / '000000.tar'}", "--decode", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"]["decoded"] == 300 and info["broken"]["unreadable images"] == 1
    assert info["images"]["where"][0]["first"][0].startswith("000137.png: corrupt PNG data")
    assert main(["data", "info", f"shards:{tmp_path / '000000.tar'}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"]["decoded"] == 256  # the seeded sample alone


@pytest.mark.slow
def test_a_stale_index_is_said_once(tmp_path):
    shard = write_shard(tmp_path / "000000.tar", [encode("PNG", k) for k in range(3)])
    cmd = [sys.executable, "-m", "m3i.cli", "data", "index", str(shard), "--no-progress"]
    assert subprocess.run(cmd, env=ENV, capture_output=True, timeout=HANG).returncode == 0
    write_shard(shard, [encode("PNG", k) for k in range(4)])
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0 and "4 samples in 1 shards" in done.stdout
    assert done.stderr.count("is stale: 1 of 1 shards changed") == 1, done.stderr


# -- image folders, eval ---------------------------------------------------------------------
def big_jpeg(path: Path) -> Path:
    """A valid 10,000 × 10,000 JPEG: 100 Mpx, above PIL's default limit of 89,478,485 pixels."""
    Image.new("L", (10_000, 10_000), 128).save(path, quality=5)
    return path


def eval_folder(root: Path) -> Path:
    for split in ("train", "test"):
        for c, colour in (("a", (250, 0, 0)), ("b", (0, 0, 250))):
            (root / split / c).mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (8, 8), colour).save(root / split / c / f"{i}.png")
    (root / "test" / "a" / "zero.png").write_bytes(b"")
    big_jpeg(root / "test" / "b" / "big.jpg")
    return root


def test_eval_names_unreadable_images_and_the_bomb_limit(tmp_path, capsys, monkeypatch):
    root = eval_folder(tmp_path / "set")
    args = ["eval", "--checkpoint", "pixels", "--task", "knn", "--dataset", f"folder:{root}", "--no-progress"]
    assert main(args) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "unreadable" in ln)
    assert line.startswith(f"folder:{root}/test: skipped 2 unreadable images of 12 (first: ")
    assert f"{root}/test/a/zero.png: empty file (0 bytes)" in line
    assert (f"{root}/test/b/big.jpg: JPEG of 100,000,000 pixels, above the decompression-bomb limit of 89,478,485 "
            "(PIL's Image.MAX_IMAGE_PIXELS); set M3I_MAX_IMAGE_PIXELS=100000000 or more to read it") in line
    monkeypatch.setenv("M3I_MAX_IMAGE_PIXELS", "100000000")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable images of 12" in out and "big.jpg" not in out and "/ 11 test)" in out
    monkeypatch.setenv("M3I_MAX_IMAGE_PIXELS", "lots")
    assert main(args) == 2
    assert "M3I_MAX_IMAGE_PIXELS='lots': expected a whole number of pixels" in capsys.readouterr().err


def test_info_names_every_kind_of_broken_file_in_a_folder(tmp_path, capsys):
    jpeg, png = encode("JPEG", size=32), encode("PNG", size=32)
    files = {"a/ok.png": (png, None), "a/cut.jpg": (jpeg[: len(jpeg) // 2], "truncated JPEG file"),
             "a/zero.png": (b"", "empty file (0 bytes)"), "a/text.png": (b"hello, not an image" * 3, "not an image"),
             "b/ok.jpg": (jpeg, None), "b/cut.png": (png[: len(png) // 2], "truncated PNG file")}
    for name, (data, _) in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    os.symlink(tmp_path / "gone.png", tmp_path / "b" / "link.png")  # a link to nothing
    assert main(["data", "info", f"folder:{tmp_path}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["samples"] == 7 and info["broken"]["unreadable images"] == 5
    assert info["images"]["kinds"] == {"truncated": 2, "empty": 1, "not an image": 1, "missing": 1}
    (where,) = info["images"]["where"]
    named = dict(f.split(": ", 1) for f in where["first"])  # the first 3, in sorted path order
    assert list(named) == [str(tmp_path / n) for n in ("a/cut.jpg", "a/text.png", "a/zero.png")]
    for n in ("a/cut.jpg", "a/text.png", "a/zero.png"):
        assert named[str(tmp_path / n)].startswith(files[n][1])


# -- manifests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, why", [
    ("folder", "is a folder: expected a JSONL or CSV file"),
    ("empty", "is empty (0 bytes)"),
    ("gzip", "is gzip-compressed: decompress it"),
    ("utf16", "is not UTF-8 text (UTF-16, or binary): save it as UTF-8"),
    ("binary", "the header row is not UTF-8 text"),
])
def test_a_manifest_that_is_no_text_file_is_one_line(tmp_path, capsys, kind, why):
    path = tmp_path / "m.csv"
    text = "path,caption\na.png,hello\n"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes({"empty": b"", "gzip": gzip.compress(text.encode()), "utf16": text.encode("utf-16"),
                          "binary": bytes(range(128, 256)) * 8}[kind])
    assert main(["data", "info", f"manifest:{path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("m3i data: error: ") and str(path) in err and why in err, err


def test_a_csv_caption_past_the_csv_field_limit_is_dropped_not_fatal(tmp_path, capsys):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text(f"path,caption\na.png,{'x' * 200_000}\nb.png,fine\n")
    assert main(["data", "info", f"manifest:{tmp_path / 'm.csv'}", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "1 captions are dropped (longer than 10000 characters, first at " in err
    info = json.loads(out)
    assert (info["samples"], info["captioned"]) == (2, 1)


def test_manifest_rows_naming_missing_files_or_folders_are_named(tmp_path, capsys):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    rows = [{"path": "a.png", "caption": "x"}, {"path": "gone.png", "caption": "y"}, {"path": "sub", "caption": "z"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "info", f"manifest:{tmp_path / 'm.jsonl'}"]) == 0
    out = capsys.readouterr().out
    assert (f"2 of 3 images unreadable (first: {tmp_path / 'gone.png'}: missing (no such file); "
            f"{tmp_path / 'sub'}: a folder, not an image file)") in out


# -- the built-in sets' cache ----------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A copy of the built-in sets' files under $M3I_DATA, each a small one."""
    from test_data_cli import builtin_sets

    root = tmp_path / "cache"
    builtin_sets(root)
    monkeypatch.setenv("M3I_DATA", str(root))
    return root


@pytest.mark.parametrize("spec, file, damage, why", [
    ("fashion-mnist:test", "fashion-mnist/t10k-labels-idx1-ubyte.gz", "cut", "cut short (the gzip stream ends early)"),
    ("fashion-mnist:test", "fashion-mnist/t10k-images-idx3-ubyte.gz", "noise", "not a readable gzip file"),
    ("fashion-mnist", "fashion-mnist/train-labels-idx1-ubyte.gz", "empty", "not an IDX file"),
    ("digits", "digits/digits.csv.gz", "cut", "cut short: the gzip stream ends early"),
    ("digits", "digits/digits.csv.gz", "noise", "not a readable gzip file"),
    ("emoji", "emoji/emoji.json", "cut", "not readable JSON"),
    ("emoji", "emoji/img/google/64/0.png", "gone", "1 of the 1 images emoji.json lists are missing (first: 0.png)"),
])
def test_a_damaged_builtin_set_is_one_line_naming_the_file_and_the_fetch(cache, capsys, spec, file, damage, why):
    path = cache / file
    data = path.read_bytes()
    if damage == "gone":
        path.unlink()
        path = path.parent
    else:
        path.write_bytes({"cut": data[: len(data) // 2], "noise": G.integers(0, 256, 64, dtype=np.uint8).tobytes(),
                          "empty": b""}[damage])
    assert main(["data", "info", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"m3i data: error: {path}: {why}") and "\n" not in err, err
    assert err.endswith(f"the set is damaged: `m3i data fetch {spec.split(':')[0]}` fetches it again")


def test_fetch_fetches_a_damaged_set_again(cache, tmp_path, capsys, monkeypatch):
    assert main(["data", "fetch", "emoji"]) == 0
    assert "emoji: already in" in capsys.readouterr().out
    image = cache / "emoji" / "img" / "google" / "64" / "0.png"
    image.write_bytes(image.read_bytes()[:30])  # cut: the source opens, the image does not decode
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # no npm here: the fetch itself then fails
    assert main(["data", "fetch", "emoji"]) == 1
    out, err = capsys.readouterr()
    assert (f"m3i data fetch: emoji: damaged in {cache / 'emoji'} (1 unreadable image(s), first: {image}: "
            "PNG header cut short or corrupt (30 bytes)); fetching it again\n") in out
    assert "emoji: `npm` not found on PATH" in err
