"""Broken data: every kind is skipped (or its caption dropped) and counted, the run finishes,
and a source that loses more than data.max_lost stops the run with one line naming it."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import HANG
from faultkit import ENV, error_lines, image_folder, m3i_cmd, metrics, pretrain_args, source_override
from m3i.cli import main
from m3i.config import load_recipe
from m3i.data import Manifest, Shards, decode_image
from m3i.data.images import MAX_CAPTION_CHARS, ImageUnreadable
from m3i.train import loop

G = np.random.default_rng(0)
PIXELS = G.integers(0, 256, (32, 32, 3), dtype=np.uint8)


def encode(fmt: str, im: Image.Image | None = None, **kw) -> bytes:
    b = io.BytesIO()
    (im or Image.fromarray(PIXELS)).save(b, fmt, **kw)
    return b.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (the decompression-bomb check reads the header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


JPEG, PNG = encode("JPEG"), encode("PNG")
BROKEN = {  # file name -> bytes; none of them can be decoded
    "truncated.jpg": JPEG[: len(JPEG) // 2],
    "corrupt.jpg": JPEG[:20] + bytes(G.integers(0, 256, len(JPEG) - 20, dtype=np.uint8)),
    "truncated.png": PNG[: len(PNG) // 2],
    "corrupt.png": PNG[:60] + bytes(b ^ 0x55 for b in PNG[60:120]) + PNG[120:],
    "zero-byte.png": b"",
    "zero-byte.jpg": b"",
    "bomb.png": png_header_only(20_000, 20_000),  # 400 Mpx: above twice PIL's limit
    "bomb-1x.png": png_header_only(10_000, 10_000),  # 100 Mpx: above the limit, below twice it
}
WHY = {  # what a run says of each: the file's format and what is wrong with it
    "truncated.jpg": "truncated JPEG file", "corrupt.jpg": "JPEG", "truncated.png": "truncated PNG file",
    "corrupt.png": "corrupt PNG data", "zero-byte.png": "empty file (0 bytes)", "zero-byte.jpg": "empty file (0 bytes)",
    "bomb.png": "PNG of 400,000,000 pixels, above the decompression-bomb limit of 89,478,485 (PIL's "
                "Image.MAX_IMAGE_PIXELS); set M3I_MAX_IMAGE_PIXELS=400000000 or more to read it",
    "bomb-1x.png": "PNG of 100,000,000 pixels, above the decompression-bomb limit of 89,478,485",
    "gone.png": "missing (no such file)", "gone-too.jpg": "missing (no such file)",
}
GRAY16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 61)
PALETTE = Image.new("P", (4, 4), 0)
PALETTE.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
PALETTE.putpixel((0, 0), 1)
UNUSUAL = {  # decodable, in modes that need care: file name -> (bytes, expected RGB array)
    "cmyk.jpg": (encode("JPEG", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100),
                 np.full((8, 8, 3), (255, 0, 0))),
    "gray16.png": (encode("PNG", Image.fromarray(GRAY16)), np.repeat((GRAY16 >> 8)[:, :, None], 3, 2)),
    "palette-transparent.png": (encode("PNG", PALETTE, transparency=0),
                                np.array([[(0, 0, 255)] + [(255, 255, 255)] * 3] + [[(255, 255, 255)] * 4] * 3)),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_image_files_raise_when_decoded(name):
    with pytest.raises(Exception):  # noqa: B017  (PIL raises OSError, SyntaxError, ValueError... by format)
        decode_image(BROKEN[name])


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_image_modes_decode_to_the_right_rgb(name):
    data, expected = UNUSUAL[name]
    got = np.asarray(decode_image(data), dtype=np.int64)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= (2 if name.endswith(".jpg") else 0)


def broken_folder(root: Path) -> Path:
    image_folder(root, per_class=12)
    for name, data in BROKEN.items():
        (root / "a" / name).write_bytes(data)
    for name, (data, _) in UNUSUAL.items():
        (root / "b" / name).write_bytes(data)
    return root


def broken_manifest(root: Path) -> Path:
    """8 good rows; 2 rows naming missing files (found when read); 2 rows with non-integer labels
    (dropped while indexing); captions that are empty, huge and not UTF-8 (dropped)."""
    image_folder(root / "img", per_class=8, classes="c")
    rows = [{"path": f"img/c/{i:03d}.png", "caption": f"picture {i}", "label": i % 2} for i in range(5)]
    rows += [{"path": "img/c/005.png", "caption": "", "label": 0},
             {"path": "img/c/006.png", "caption": "x" * (MAX_CAPTION_CHARS + 1), "label": 1}]
    rows += [{"path": "img/gone.png", "caption": "missing", "label": 0},
             {"path": "img/gone-too.jpg", "caption": "missing", "label": 1},
             {"path": "img/c/000.png", "caption": "bad label", "label": "cat"},
             {"path": "img/c/001.png", "caption": "bad label", "label": 1.5}]
    lines = [json.dumps(r).encode() for r in rows]
    lines.append(b'{"path": "img/c/007.png", "caption": "caf\xe9 latin-1", "label": 0}')  # not UTF-8
    path = root / "manifest.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def truncated_shard(root: Path) -> Path:
    """6 samples; the file is cut inside the 5th image."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(6):
            for ext, data in (("png", encode("PNG", Image.fromarray(PIXELS[i:i + 16, i:i + 16]))),
                              ("txt", f"sample {i}".encode()), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        cut = next(m for m in tf if m.name == "000004.png").offset_data + 10
    path = root / "shard-000000.tar"
    path.write_bytes(raw[:cut])
    return path


def test_manifest_and_shard_faults_are_dropped_and_counted(tmp_path):
    with pytest.warns(UserWarning) as caught:
        m = Manifest(broken_manifest(tmp_path))
    assert len(m) == 10 and m.num_dropped == 2  # the two rows with non-integer labels
    assert all("field 'label'" in d for d in m.dropped)
    assert m.num_bad_captions == 3 and m.num_empty_captions == 1  # empty, huge, not UTF-8
    assert m.all_captions() == [f"picture {i}" for i in range(5)] + ["missing", "missing"]
    assert any("2 captions are dropped" in str(w.message) for w in caught)
    with pytest.raises(ImageUnreadable, match=r"img/gone\.png: missing \(no such file\)"):
        m.get(7)  # a missing file is found when read (and skipped by the mixture)
    with pytest.warns(UserWarning, match="shard-000000.tar: truncated: the file ends inside 000004.png"):
        s = Shards(str(truncated_shard(tmp_path)))
    assert len(s) == 4 and s.num_dropped == 1
    assert [s.get(i)["caption"] for i in range(4)] == [f"sample {i}" for i in range(4)]


def unreadable(path: str) -> bool:
    """Whether plain PIL fails to load the file behind a sample."""
    try:
        if ".tar:" in path:  # a shard member: SHARD.tar:KEY.EXT
            shard, member = path.split(".tar:")
            with tarfile.open(shard + ".tar") as tf:
                m = tf.next()
                while m.name != member:
                    m = tf.next()
                data = tf.extractfile(m).read()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
            return False
        with Image.open(path) as im:
            im.load()
        return False
    except Exception:
        return True


def named_unreadable(stderr: str) -> list[tuple[str, str]]:
    """(file, what is wrong) of each unreadable image a run's warnings name."""
    head = "m3i: warning: unreadable image "
    lines = [ln[len(head):] for ln in stderr.splitlines() if ln.startswith(head)]
    return [tuple(ln.split("; replaced by another sample")[0].split(": ", 1)) for ln in lines]


def run_errors(stderr: str) -> list[str]:
    return [ln for ln in error_lines(stderr) if not ln.startswith("m3i: warning: ")]


def replay_skips(recipe, steps: int) -> int:
    """Unreadable draws of the mixture's documented random streams: per slot of the step's plan,
    its planned index, then the indices of the slot's own stream until one is readable."""
    mixture = loop.build_mixture(recipe)
    skipped = 0
    for step in range(steps):
        for slot, (k, i) in enumerate(zip(*mixture.global_plan(step))):
            src, g = mixture.sources[int(k)], mixture.slot_rng(step, slot)
            while unreadable(src.locate(int(i))):
                skipped += 1
                i = g.integers(len(src))
                assert skipped < 10_000
    return skipped


@pytest.mark.slow
def test_a_run_over_every_kind_of_broken_data_finishes_and_counts_what_it_skipped(tmp_path, capsys):
    folder, manifest = broken_folder(tmp_path / "folder"), broken_manifest(tmp_path / "m")
    shard = truncated_shard(tmp_path)
    caption_term = ("terms.2={name: caption, source: {view: 0}, target: {kind: caption}, target_encoder: "
                    "{kind: text, tower: scratch, trainable: true, width: 32, depth: 1}, decoder: "
                    "{kind: global, projector: [32]}, estimator: {kind: boltzmann, candidates: batch}}")
    overrides = [source_override(f"folder:{folder}", f"manifest:{manifest}", f"shards:{shard}"),
                 "train.steps=12", "train.ckpt_every=12", "data.max_lost=0.5", caption_term]
    assert main(pretrain_args(tmp_path / "run", folder, *overrides)[:-len(overrides) - 1] + overrides) == 0
    out, err = capsys.readouterr()
    assert f"m3i: warning: 1 of 1 shards are damaged (first: {shard}: truncated: the file ends inside 000004.png" in err
    named = named_unreadable(err)
    assert 1 <= len(named) <= 3 * 2  # the first 3 of each source with unreadable images (folder, manifest)
    for path, why in named:  # each named with what is wrong with it
        assert unreadable(path) and WHY[Path(path).name] in why, (path, why)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 13)) and rows[-1]["bad_steps"] == 0
    with pytest.warns(UserWarning):
        expected = replay_skips(load_recipe(str(tmp_path / "run" / "config.yaml")), 12)
    assert expected > 0 and rows[-1]["skipped_images"] == expected
    assert f"skipped {expected} unreadable images" in out


@pytest.mark.slow
def test_a_source_losing_more_than_max_lost_stops_the_run_with_one_line(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", per_class=4, classes="a")
    for i in range(6):
        (folder / "a" / f"broken-{i}.png").write_bytes(BROKEN["truncated.png"])
    assert main(pretrain_args(tmp_path / "run", folder, "train.steps=30", "data.max_lost=0.3")) == 1
    (line,) = run_errors(capsys.readouterr().err)
    assert line.startswith(f"m3i pretrain: error: source 'folder:{folder}': ")
    assert "> data.max_lost=0.3" in line and "broken-" in line and "raise data.max_lost" in line
    assert ": truncated PNG file (" in line and f"`m3i data info folder:{folder}` lists them" in line
    # a source whose index already lost too much stops before training
    manifest = broken_manifest(tmp_path / "m")
    assert main(pretrain_args(tmp_path / "run2", folder, source_override(f"manifest:{manifest}"),
                              "data.max_lost=0.1")[:-2] + [source_override(f"manifest:{manifest}"),
                                                           "data.max_lost=0.1"]) == 1
    (line,) = run_errors(capsys.readouterr().err)
    assert "2 of 12 entries are unusable (17% > data.max_lost=0.1; first: " in line and "field 'label'" in line


@pytest.mark.slow
def test_a_source_of_only_unreadable_images_gives_one_line_not_a_worker_traceback(tmp_path):
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    for i in range(5):
        (folder / "a" / f"{i}.jpg").write_bytes(BROKEN["truncated.jpg"])
    done = subprocess.run(m3i_cmd(*pretrain_args(tmp_path / "run", folder, "data.num_workers=1")),
                          env=ENV, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = run_errors(done.stderr)
    assert line.startswith(f"m3i pretrain: error: source 'folder:{folder}': ")
    assert f"{folder}/a/" in line and ("check its files" in line or "fix or remove the broken files" in line)
    named = named_unreadable(done.stderr)  # by the DataLoader worker, the first 3 only
    assert len(named) == 3 and all(why.startswith("truncated JPEG file (") for _, why in named)
    assert {Path(p).parent for p, _ in named} == {folder / "a"}
