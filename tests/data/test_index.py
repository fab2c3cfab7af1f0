"""The shard-set index against Python's own tarfile reader: member offsets in every tar
flavour, the set's arrays memory-mapped and compact, staleness, rebuilding and sharing."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from m3i.data import Shards
from m3i.data import index as index_mod
from m3i.data.index import ShardIndex, open_index, scan_shard, split_key
from conftest import HANG


def write_tar(path, samples, fmt=tarfile.PAX_FORMAT, extra=()):
    """samples: [(key, {ext: bytes})]; extra: members written after them ((name, bytes))."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def reference(path):
    """(key, image offset, image size, text offset, text size, cls) per sample, from tarfile."""
    rows = {}
    with tarfile.open(path) as tf:
        for m in tf:
            base = os.path.basename(m.name)
            key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
            ext = base.split(".", 1)[1].lower()
            r = rows.setdefault(key, {})
            if ext in ("jpg", "png"):
                r["image"] = (m.offset_data, m.size)
            elif ext == "txt":
                r["txt"] = (m.offset_data, m.size)
            elif ext == "cls":
                r["cls"] = tf.extractfile(m).read().decode().strip()
    return [(k, *r["image"], *r.get("txt", (0, 0)), r.get("cls")) for k, r in rows.items() if "image" in r]


def rows_of(scan):
    a = scan.arrays
    ends = np.cumsum(scan.key_len)
    keys = [scan.keys[e - n:e].decode() for e, n in zip(ends, scan.key_len)]
    return [(keys[r], int(a["image_offset"][r]), int(a["image_size"][r]), int(a["text_offset"][r]),
             int(a["text_size"][r]), scan.labels[a["label"][r]] if a["label"][r] >= 0 else None)
            for r in range(len(keys))]


@pytest.mark.parametrize("name", ["a.jpg", "k.seg.png", "dir/k.JPG", "a/b.c/d.jpg", "dir.x/file", ".hidden.jpg",
                                  "a/.b", "d/.x.jpg", "noext", "x/y/z.tar.gz", "a.", "d/é.txt", "a/b/"])
def test_keys_are_split_by_webdatasets_rule(name):
    from webdataset.tariterators import base_plus_ext

    assert split_key(name) == base_plus_ext(name)


SAMPLES = [(f"{i:05d}", {"jpg": bytes([i]) * (100 + 37 * i), "txt": f"caption {i}".encode(), "cls": str(i % 3).encode()})
           for i in range(5)]
SAMPLES += [("d" * 120 + "/long", {"png": b"p" * 700, "txt": "é".encode()}),  # name past 100 chars
            ("dir/sub/only_text", {"txt": b"no image"}),  # a key without an image
            ("x" * 90 + "/ü-key", {"jpg": b"j" * 513})]  # non-ASCII: a pax header


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_scan_matches_tarfile_in_every_flavour(tmp_path, fmt):
    samples = SAMPLES if fmt != tarfile.USTAR_FORMAT else [s for s in SAMPLES if s[0].isascii() and len(s[0]) < 150]
    path = write_tar(tmp_path / "a.tar", samples, fmt)
    scan = scan_shard(str(path))
    assert rows_of(scan) == reference(path)
    assert scan.no_image == 1 and scan.cut == 0 and not scan.truncated
    assert scan.members == sum(len(m) for _, m in samples)


def test_scan_of_a_cut_shard_keeps_its_whole_samples(tmp_path):
    path = write_tar(tmp_path / "a.tar", SAMPLES[:5])
    raw = path.read_bytes()
    with tarfile.open(path) as tf:
        cut = next(m for m in tf if m.name == "00003.jpg").offset_data + 10
    path.write_bytes(raw[:cut])
    scan = scan_shard(str(path))
    assert [r[0] for r in rows_of(scan)] == ["00000", "00001", "00002"]
    assert scan.truncated and scan.cut == 1
    path.write_bytes(raw[:cut - 10 - 512])  # cut just before a header: no end-of-archive blocks
    scan = scan_shard(str(path))
    assert scan.truncated and scan.cut == 0 and len(rows_of(scan)) == 3


def test_scan_says_what_is_wrong_with_what_is_no_tar(tmp_path):
    gz = tmp_path / "a.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "noise.tar").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expected = {"a.tar.gz": "gzip-compressed, not a plain tar", "empty.tar": "empty file (0 bytes)",
                "noise.tar": "not a tar file (no tar header at its start)"}
    for name, why in expected.items():
        scan = scan_shard(str(tmp_path / name))
        assert scan.truncated and scan.damage.startswith(why) and len(rows_of(scan)) == 0, (name, scan.damage)


def test_scan_of_a_garbled_shard_keeps_the_samples_before_the_garbage(tmp_path):
    path = write_tar(tmp_path / "a.tar", SAMPLES[:5])
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        at = next(m for m in tf if m.name == "00002.jpg").offset  # the header of the 3rd sample's image
    raw[at:at + 512] = b"\xa5" * 512
    path.write_bytes(bytes(raw))
    scan = scan_shard(str(path))
    assert [r[0] for r in rows_of(scan)] == ["00000", "00001"]
    assert scan.damage == f"corrupt: no valid tar header at byte {at:,} after 00001.cls; the rest of the file is lost"


def shard_set(tmp_path, n_shards=3, per=4):
    paths = []
    for s in range(n_shards):
        samples = [(f"{s}{i:04d}", {"jpg": bytes([s, i]) * 50, "txt": f"c {s} {i}".encode(),
                                    "cls": (f"{(s * per + i) % 5}" if i % 2 == 0 else "7").encode()})
                   for i in range(per)]
        paths.append(str(write_tar(tmp_path / f"{s:06d}.tar", samples)))
    return paths


def test_set_index_is_compact_memory_mapped_and_matches_each_shard(tmp_path):
    paths = shard_set(tmp_path)
    idx = open_index(paths, processes=2, progress=False)
    assert idx.path.parent == tmp_path and idx.path.name.startswith(".m3i-index-")
    assert len(idx) == 12 and [s["start"] for s in idx.shards] == [0, 4, 8]
    for name in ("image_offset", "image_size", "text_offset", "text_size", "label", "ext", "key_end", "keys"):
        assert isinstance(idx.maps[name], np.memmap) and np.shares_memory(getattr(idx, name), idx.maps[name]), name
    per_sample = sum(getattr(idx, n).nbytes for n in ("image_offset", "image_size", "text_offset", "text_size",
                                                       "label", "ext", "key_end", "keys")) / len(idx)
    assert per_sample == 29 + 4 + 5  # 29 bytes of fields, key_end (uint32) and the 5-character keys
    for k, p in enumerate(paths):
        rows = idx.rows(k)
        for r, ref in zip(range(rows.start, rows.stop), reference(p)):
            got = (idx.key(r), int(idx.image_offset[r]), int(idx.image_size[r]), int(idx.text_offset[r]),
                   int(idx.text_size[r]), idx.labels[idx.label[r]])
            assert got == ref
    serial = ShardIndex(open_index(paths, processes=1, progress=False, rebuild=True).path)
    for name in ("image_offset", "label", "keys", "key_end"):
        assert np.array_equal(getattr(serial, name), getattr(idx, name))


def test_index_is_reused_then_rebuilt_for_changed_shards_only(tmp_path, monkeypatch):
    paths = shard_set(tmp_path)
    first = open_index(paths, processes=1, progress=False)
    scanned = []
    real = index_mod.scan_shard
    monkeypatch.setattr(index_mod, "scan_shard", lambda p: scanned.append(p) or real(p))
    assert open_index(paths, processes=1, progress=False).created == first.created and scanned == []
    write_tar(paths[1], [("new00", {"png": b"q" * 900, "cls": b"brand new"})])  # other size: stale
    with pytest.warns(UserWarning, match=r"stale: 1 of 3 shards changed .*000001\.tar"):
        idx = open_index(paths, processes=1, progress=False)
    assert scanned == [paths[1]]
    assert len(idx) == 9 and [s["samples"] for s in idx.shards] == [4, 1, 4]
    assert idx.key(4) == "new00" and idx.labels[idx.label[4]] == "brand new"
    for r in list(range(4)) + list(range(5, 9)):  # the kept shards' rows, labels re-coded
        old = r if r < 4 else r + 3
        assert idx.key(r) == first.key(old) and idx.image_offset[r] == first.image_offset[old]
        assert idx.labels[idx.label[r]] == first.labels[first.label[old]]
    os.utime(paths[2], ns=(1, 1))  # the same size, another mtime: stale too
    with pytest.warns(UserWarning, match="stale: 1 of 3"):
        open_index(paths, processes=1, progress=False)
    assert scanned == [paths[1], paths[2]]


def test_unreadable_index_is_rebuilt_and_read_only_folders_use_the_cache(tmp_path, monkeypatch):
    paths = shard_set(tmp_path, 1)
    idx = open_index(paths, progress=False)
    idx.path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        assert len(open_index(paths, progress=False)) == 4
    idx.path.unlink()
    monkeypatch.setenv("M3I_INDEX_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(index_mod, "_writable", lambda folder: folder != tmp_path)
    again = open_index(paths, progress=False)
    assert again.path.parent == tmp_path / "cache" and len(again) == 4


def test_shards_read_through_the_index_and_survive_pickling(tmp_path):
    paths = shard_set(tmp_path, 2)
    src = Shards(str(tmp_path / "*.tar"), progress=False)
    assert src.num_classes == 8  # labels 0..4 and 7
    with tarfile.open(paths[1]) as tf:
        assert src.index.key(5) == "10001"
        assert src._read(5, int(src.index.image_offset[5]), int(src.index.image_size[5])) == \
            tf.extractfile("10001.jpg").read()
    assert src._caption(5) == "c 1 1" and src._label(5) == 7 and src._label(4) == 4
    assert src.locate(5).endswith("000001.tar:10001.jpg")
    copy = pickle.loads(pickle.dumps(src))
    assert isinstance(copy.index.maps["image_offset"], np.memmap) and copy._fds == {}
    assert copy._caption(5) == "c 1 1"
    s = src.summary()
    assert (s["samples"], s["labelled"], s["captioned"], s["shards"]) == (8, 8, 8, 2)
    assert s["broken"] == {"keys without an image": 0, "members cut off": 0, "damaged shards": 0,
                           "unreadable images": 8}  # the members hold bytes, not images
    assert s["images"]["kinds"] == {"not an image": 8} and s["images"]["checked"] == 8
    assert [(w["where"], w["broken"], w["images"]) for w in s["images"]["where"]] == [(p, 4, 4) for p in paths]
    assert s["index"]["bytes"] == src.index.path.stat().st_size


def test_non_integer_cls_names_its_shard_and_key(tmp_path):
    write_tar(tmp_path / "000000.tar", [("k1", {"jpg": b"x", "cls": b"3"}), ("k2", {"jpg": b"y", "cls": b"cat"})])
    with pytest.raises(ValueError, match=r"000000\.tar'?: k2\.cls holds 'cat', but the first label of the shards is an integer id"):
        Shards(str(tmp_path / "000000.tar"), progress=False)


def _open_in_child(paths, log):
    real = index_mod.scan_shard

    def counted(p):
        with open(log, "a") as f:
            f.write(p + "\n")
        return real(p)

    index_mod.scan_shard = counted
    open_index(paths, processes=1, progress=False)


def test_ranks_starting_together_build_the_index_once(tmp_path):
    import multiprocessing as mp

    paths = shard_set(tmp_path, 4)
    log = tmp_path / "scans.txt"
    ctx = mp.get_context("fork")
    ranks = [ctx.Process(target=_open_in_child, args=(paths, str(log))) for _ in range(3)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=HANG)
        if p.exitcode is None:
            p.kill()
    assert [p.exitcode for p in ranks] == [0, 0, 0]  # None: still running after conftest.HANG (a hang)
    assert sorted(log.read_text().split()) == sorted(paths)  # each shard scanned once, by one of them
