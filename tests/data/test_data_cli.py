"""`m3i data index | info | fetch`: indexing ahead of time, what a source holds, and the parts
of fetching that need no network (installing from the registries' own package formats)."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from m3i.cli import main
from m3i.data import FashionMNIST
from m3i.data import fetch as fetch_mod
from m3i.data.index import ShardIndex

ROOT = Path(__file__).resolve().parents[2]


def shard_set(root: Path) -> str:
    import webdataset as wds
    from PIL import Image

    k = 0
    for s, n in enumerate((3, 2)):
        with wds.TarWriter(str(root / f"{s:06d}.tar")) as w:
            for _ in range(n):
                buf = io.BytesIO()
                Image.new("RGB", (5, 5), (k, 0, 0)).save(buf, format="PNG")
                sample = {"__key__": f"{k:06d}", "png": buf.getvalue()}
                if k % 2 == 0:
                    sample["txt"] = f"caption {k}"
                if k < 4:
                    sample["cls"] = str(k % 3)
                w.write(sample)
                k += 1
            w.write({"__key__": "orphan", "txt": "a caption without an image"})
    return f"{root}/{{000000..000001}}.tar"


def test_index_then_info(tmp_path, capsys):
    pattern = shard_set(tmp_path)
    assert main(["data", "index", pattern, "--processes", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "5 samples in 2 shards" in out and "built in" in out
    (path,) = tmp_path.glob(".m3i-index-*.bin")
    assert str(path) in out and len(ShardIndex(path)) == 5
    assert main(["data", "index", f"shards:{pattern}", "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out

    assert main(["data", "info", f"shards:{pattern}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["samples"], info["labelled"], info["captioned"], info["classes"]) == (5, 4, 3, 3)
    assert info["broken"]["keys without an image"] == 2 and info["index"]["path"] == str(path)
    assert main(["data", "info", f"shards:{pattern}"]) == 0
    text = capsys.readouterr().out
    assert "labelled:  4 (80.0%)" in text and "captioned: 3 (60.0%)" in text and "keys without an image 2" in text
    assert "bytes/sample" in text and "ago)" in text


def test_info_of_other_sources_and_errors(tmp_path, capsys):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "f" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "f" / name / "x.png")
    assert main(["data", "info", f"folder:{tmp_path / 'f'}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["samples"], info["labelled"], info["captioned"], info["classes"]) == (2, 2, 0, 2)
    assert main(["data", "index", str(tmp_path / "none-*.tar")]) == 2
    assert "m3i data: error: no shard matches" in capsys.readouterr().err


# -- fetch, offline parts ------------------------------------------------------------------------
def fake_idx_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in fetch_mod.FASHION_MNIST_FILES:
        with gzip.open(folder / f, "wb") as g:
            g.write(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a package")
def test_fashion_mnist_from_a_debian_package(tmp_path):
    tree = tmp_path / "pkg"
    fake_idx_files(tree / "usr" / "share" / "datasets" / "fashion-mnist")
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text("Package: dataset-fashion-mnist\nVersion: 1.0\nArchitecture: all\n"
                                            "Maintainer: none <none@example.org>\nDescription: test\n")
    deb = tmp_path / "dataset-fashion-mnist_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True, capture_output=True)
    src = fetch_mod.unpack_deb(deb, tmp_path / "x")
    fetch_mod.install_fashion_mnist(src, tmp_path / "data" / "fashion-mnist")
    assert fetch_mod.has_fashion_mnist(tmp_path / "data" / "fashion-mnist")
    assert not (tmp_path / "data" / "fashion-mnist.partial").exists()


def test_emoji_from_an_npm_tarball(tmp_path):
    tgz = tmp_path / "emoji-datasource-google-16.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        for name, data in (("package/emoji.json", b"[]"), ("package/img/google/64/1f600.png", b"png"),
                           ("package/img/google/64/1f601.png", b"png2"), ("package/img/google/32/1f600.png", b"no"),
                           ("package/README.md", b"no")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    dest = tmp_path / "data" / "emoji"
    assert fetch_mod.install_emoji(tgz, dest) == 2
    assert sorted(p.name for p in (dest / "img" / "google" / "64").iterdir()) == ["1f600.png", "1f601.png"]
    assert (dest / "emoji.json").read_bytes() == b"[]" and not (dest / "README.md").exists()
    assert not fetch_mod.has_emoji(dest)  # 2 images are not the set: fetched again next time


def test_digits_from_the_scikit_learn_wheel(tmp_path):
    wheel = tmp_path / "scikit_learn-1.7.2-cp311-cp311-manylinux.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(fetch_mod.DIGITS_MEMBER, b"digits!")
        z.writestr("sklearn/__init__.py", b"")
    fetch_mod.install_digits(wheel, tmp_path / "digits")
    assert (tmp_path / "digits" / "digits.csv.gz").read_bytes() == b"digits!"


def builtin_sets(root: Path) -> None:
    """The three built-in sets in their fetched layout, tiny but readable by their sources."""
    from PIL import Image

    (root / "fashion-mnist").mkdir(parents=True)
    for f in fetch_mod.FASHION_MNIST_FILES:  # two 2×2 images, labels 3 and 7
        dims, values = ((2, 2, 2), bytes(8)) if "images" in f else ((2,), bytes([3, 7]))
        with gzip.open(root / "fashion-mnist" / f, "wb") as g:
            g.write(b"\x00\x00\x08" + bytes([len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + values)
    images = root / "emoji" / "img" / "google" / "64"
    images.mkdir(parents=True)
    (root / "emoji" / "emoji.json").write_text('[{"name": "A", "image": "0.png", "category": "c", "has_img_google": true}]')
    for i in range(fetch_mod.EMOJI_MIN_IMAGES):
        Image.new("RGBA", (4, 4)).save(images / f"{i}.png")
    (root / "digits").mkdir()
    with gzip.open(root / "digits" / "digits.csv.gz", "wt") as g:
        g.write(",".join(["0"] * 64 + ["3"]) + "\n")


def test_fetch_keeps_sets_in_place_and_runs_nothing(tmp_path):
    root = tmp_path / "data"
    builtin_sets(root)
    env = {**os.environ, "M3I_DATA": str(root), "PATH": str(tmp_path / "no-tools"),  # no apt-get, npm, pip
           "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "m3i.cli", "data", "fetch"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("already in") == 3
    proc = subprocess.run([sys.executable, "-m", "m3i.cli", "data", "fetch", "mnist"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "unknown data set 'mnist'" in proc.stderr


def test_a_missing_command_is_one_line_and_missing_data_names_the_fetch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    assert main(["data", "fetch", "emoji", "--root", str(tmp_path / "data")]) == 1
    assert "m3i data: error: emoji: `npm` not found on PATH" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="fetch it with `m3i data fetch`"):
        FashionMNIST(tmp_path / "nowhere")
