"""A new user's command lines on their own data: folders in every layout, manifests and shards
built here, each case a real `m3i` command line (in process where no child process is needed).
Every test is one case where m3i once gave a silently wrong result or a raw traceback."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
import yaml

from clikit import (FAST, TINY, class_root, error_line, images, labelled_rows, metrics, png, run_m3i, shard,
                    sources, split_root, write_csv, write_jsonl)
from conftest import needs_data
from ranks import run_ranks
from m3i.cli import main
from m3i.config import load_recipe
from m3i.data import Mixture, build_source
from m3i.runs import checkpoint as ckpt

ROOT = Path(__file__).parents[2]
SCRATCH_CLIP = ["backbone.name=vit_nano", "backbone.depth=1", "data.batch_size=8",
                "terms.0.target_encoder.tower=scratch"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``m3i ARGS`` in this process -> (exit code, stdout, stderr); argparse's exits included."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args: str) -> str:
    """``m3i ARGS`` must exit 2 with one line (no traceback): that line."""
    code, out, err = cli(capsys, *args)
    assert code == 2, (code, out[-2000:], err[-2000:])
    return error_line(err)


# -- data every test shares, built once ------------------------------------------------------
@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def classes(tmp):
    return class_root(tmp / "classes", n=8)


@pytest.fixture(scope="module")
def flat(tmp):
    images(tmp / "flat", 8)
    return tmp / "flat"


@pytest.fixture(scope="module")
def captioned(tmp, classes):
    """A JSONL manifest: every image of ``classes`` with a caption and an integer label."""
    return write_jsonl(tmp / "captioned.jsonl", labelled_rows(classes, {"a": 0, "b": 1}))


@pytest.fixture(scope="module")
def run(tmp, classes):
    """A tiny pre-training run (2 steps) on the class folder."""
    out = tmp / "run"
    assert main(["pretrain", "--recipe", TINY, "--out", str(out), "--steps", "2", *FAST, sources(f"folder:{classes}"),
                 "train.ckpt_every=2"]) == 0
    return out


@pytest.fixture(scope="module")
def clip_run(tmp, captioned):
    out = tmp / "clip"
    assert main(["pretrain", "--recipe", "clip", "--out", str(out), "--steps", "1", *FAST, *SCRATCH_CLIP,
                 sources(f"manifest:{captioned}")]) == 0
    return out


# -- 1. split folders --------------------------------------------------------------------------
def test_01_split_folders_are_splits_not_classes(tmp, run, capsys):
    root = split_root(tmp / "three", {"train": 6, "val": 3, "test": 2})
    inet = split_root(tmp / "imagenet", {"train": 6, "val": 3})  # ImageNet's layout: val/ is what is scored

    def knn(dataset, *extra):
        out = tmp / "knn.json"
        code, _, err = cli(capsys, "eval", "--checkpoint", "pixels", "--task", "knn", "--dataset", dataset,
                           "--json", out, "--no-progress", *extra)
        assert code == 0, err[-2000:]
        return json.loads(out.read_text())

    r = knn(f"folder:{root}")
    assert (r["n_train"], r["n_test"]) == (12, 4) and r["metrics"]["top1"] == 1.0  # train/ probes, test/ scored
    assert (knn(f"folder:{root}", "--split", "val")["n_test"]) == 6  # val/ for choices, never test/
    r = knn(f"folder:{inet}")
    assert (r["n_train"], r["n_test"]) == (12, 6)
    r = knn(f"folder:{inet}", "--split", "val")  # no test/: the val split is carved from train/
    assert r["n_train"] + r["n_test"] == 12

    src = build_source(f"folder:{root}")  # pre-training reads train/ alone, its class folders as classes
    assert src.class_names == ["a", "b"] and len(src) == 12
    assert all(os.sep + "train" + os.sep in src.locate(i) for i in range(len(src)))

    res = tmp / "ft.json"
    code, _, err = cli(capsys, "finetune", "--checkpoint", run, "--dataset", f"folder:{root}", "--steps", "1",
                       "--out", tmp / "ft", "--json", res, "--no-progress", "--device", "cpu", "batch_size=4")
    assert code == 0, err[-2000:]
    assert json.loads(res.read_text())["n_test"] == 4
    assert json.loads((ckpt.find(tmp / "ft") / ckpt.STATE_FILE).read_text())["classes"] == ["a", "b"]


# -- 2. a target the mixture never carries -------------------------------------------------------
def test_02_a_term_whose_target_never_appears_fails_before_training(tmp, flat, capsys):
    out = tmp / "clip-flat"
    line = refused(capsys, "pretrain", "--recipe", "clip", "--out", out, "--steps", "2", *FAST, *SCRATCH_CLIP,
                   sources(f"folder:{flat}"))
    assert "terms.0" in line and "'caption'" in line and "caption" in line and f"folder:{flat}" in line
    assert not out.exists()
    line = refused(capsys, "pretrain", "--recipe", TINY, "--out", out, "--steps", "2", *FAST, sources(f"folder:{flat}"))
    assert "terms.0" in line and "'category'" in line and "label" in line and f"folder:{flat}" in line


# -- 3 and 20. two ranks -------------------------------------------------------------------------
CAPTION_TERM = ("terms.2={name: caption, source: {view: 0}, target: {kind: caption}, target_encoder: {kind: text, "
                "tower: minilm}, decoder: {kind: global, projector: [16]}, estimator: {kind: boltzmann, "
                "candidates: batch, directions: 2, temperature: 0.07}}")
TWO_RANKS_STEPS = 3


def _rank_worker(rank, args, folder):
    import sys

    out, err = open(f"{folder}/rank{rank}.out", "w"), open(f"{folder}/rank{rank}.err", "w")
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout, sys.stderr = os.fdopen(1, "w", buffering=1), os.fdopen(2, "w", buffering=1)
    import torch.distributed as tdist

    try:
        assert main(args) == 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if tdist.is_initialized():
            tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp, classes):
    """A 2-rank run (global batch 8, every sample labelled and captioned) on a manifest with 8
    unreadable images of 24; progress bars on."""
    folder = tmp / "ranks"
    rows = labelled_rows(classes, {"a": 0, "b": 1})[:16]
    for k, name in enumerate("stuvwxyz"):
        bad = classes.parent / "broken" / f"{name}.png"
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(b"not an image" * (k + 1))
        rows.append({"path": str(bad.relative_to(classes.parent)), "caption": f"broken {name}", "label": k % 2})
    man = write_jsonl(tmp / "ranks.jsonl", rows)
    run = folder / "run"
    folder.mkdir()
    args = ["pretrain", "--recipe", TINY, "--out", str(run), "--steps", str(TWO_RANKS_STEPS), "--device", "cpu",
            "data.num_workers=0", "train.log_every=1", "data.max_lost=0.6", "data.batch_size=8", CAPTION_TERM,
            sources(f"manifest:{man}")]
    run_ranks(_rank_worker, args, str(folder), rendezvous="env")  # as torchrun starts them
    recipe = load_recipe(TINY, overrides=[sources(f"manifest:{man}"), "data.batch_size=8"])
    skipped = []  # what each rank's batches skip: the mixture is a pure function of (seed, rank, step)
    for rank in (0, 1):
        mix = Mixture([build_source(f"manifest:{man}")], None, 4, recipe.data.image_size, seed=recipe.train.seed,
                      rank=rank, world_size=2, max_lost=1.0)
        skipped.append(sum(mix.batch(s)["n_skipped"] for s in range(TWO_RANKS_STEPS)))
    logs = {f"{r}.{k}": (folder / f"rank{r}.{k}").read_text() for r in (0, 1) for k in ("out", "err")}
    return run, skipped, logs


@pytest.mark.slow  # gloo ranks
def test_03_counts_cover_every_rank(two_ranks):
    run, skipped, logs = two_ranks
    assert skipped[0] > 0 and skipped[1] > 0  # both ranks skip: rank 0's count alone is short
    rows = metrics(run)
    assert [r["n_category"] for r in rows] == [8] * TWO_RANKS_STEPS  # the global batch: 2 ranks × 4
    assert [r["n_caption"] for r in rows] == [8] * TWO_RANKS_STEPS
    assert rows[-1]["skipped_images"] == sum(skipped)
    assert f"skipped {sum(skipped)} unreadable images" in logs["0.out"]
    assert ckpt.load(run)[1]["skipped_images"] == sum(skipped)


# -- 4. relative data paths ---------------------------------------------------------------------
def test_04_relative_data_paths_are_stored_absolute(tmp, classes, monkeypatch, capsys):
    work = tmp / "work"
    rows = [{"path": f"img/{i}.png", "caption": f"c{i}", "label": i % 2} for i in range(8)]
    for i in range(8):
        (work / "man" / "img").mkdir(parents=True, exist_ok=True)
        (work / "man" / "img" / f"{i}.png").write_bytes(png((200, 20 * i, 0), i))
    write_jsonl(work / "man" / "train.jsonl", rows)
    run = tmp / "relative"
    monkeypatch.chdir(work)
    code, _, err = cli(capsys, "pretrain", "--recipe", TINY, "--out", run, "--steps", "2", *FAST,
                       sources("manifest:man/train.jsonl"))
    assert code == 0, err[-2000:]
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]["sources"][0]["spec"]
    assert saved == f"manifest:{work / 'man' / 'train.jsonl'}"
    other = tmp / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    code, _, err = cli(capsys, "pretrain", "--resume", run, "--steps", "3", *FAST)
    assert code == 0, err[-2000:]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]


# -- 5. manifests: BOM, text labels; shards with names -----------------------------------------
def test_05_manifests_with_a_bom_and_label_names(tmp, capsys):
    root = class_root(tmp / "m5" / "img", n=3, classes="abc")
    rows = labelled_rows(root, {"a": "cat", "b": "dog", "c": "cat"})
    excel = write_csv(tmp / "m5" / "excel.csv", rows, bom=True)
    jsonl = write_jsonl(tmp / "m5" / "bom.jsonl", rows, bom=True)
    for path in (excel, jsonl):
        src = build_source(f"manifest:{path}")
        assert (len(src), src.num_dropped, src.class_names) == (9, 0, ["cat", "dog"]), path
        assert [src.get(i)["label"] for i in range(9)] == [0, 0, 0, 1, 1, 1, 0, 0, 0]
        assert src.get(0)["caption"] == "a a square"
    tar = shard(tmp / "m5" / "names.tar", [(f"{i:03d}", png((200, 0, 0), i), f"cap {i}", ["dog", "cat"][i % 2])
                                           for i in range(6)])
    src = build_source(f"shards:{tar}")
    assert src.class_names == ["cat", "dog"] and [src.get(i)["label"] for i in range(6)] == [1, 0, 1, 0, 1, 0]

    run = tmp / "m5-run"
    code, _, err = cli(capsys, "pretrain", "--recipe", TINY, "--out", run, "--steps", "2", *FAST,
                       sources(f"manifest:{excel}", f"shards:{tar}"))
    assert code == 0, err[-2000:]
    recorded = json.loads((run / "classes.json").read_text())
    assert recorded["classes"] == ["cat", "dog", "cat", "dog"]
    assert [s["classes"] for s in recorded["sources"]] == [["cat", "dog"], ["cat", "dog"]]
    assert [s["offset"] for s in recorded["sources"]] == [0, 2]


# -- 6, 10, 11, 12. evaluation refuses what it cannot score ----------------------------------------
@pytest.fixture(scope="module")
def one_class(tmp):
    return class_root(tmp / "one", n=8, classes="a")


@pytest.mark.parametrize("case", ["one-class-knn", "one-class-linear", "one-class-zeroshot", "fashion-mnist:banana",
                                  "digits:train", "limit-0"])
def test_06_eval_refuses_sets_it_cannot_score(case, one_class, clip_run, capsys):
    checkpoint, task, dataset, extra = "pixels", "knn", f"folder:{one_class}", []
    if case.startswith("one-class"):
        task = case.rsplit("-", 1)[1]
        checkpoint = clip_run if task == "zeroshot" else checkpoint
    elif case == "limit-0":
        dataset, extra = "digits", ["--limit", "0"]
    else:
        from conftest import have_builtin_data

        if not have_builtin_data():
            pytest.skip("built-in data not fetched")
        dataset = case
    line = refused(capsys, "eval", "--checkpoint", checkpoint, "--task", task, "--dataset", dataset, "--no-progress",
                   *extra)
    assert (dataset in line or "--limit" in line), line
    if case.startswith("one-class"):
        assert "one class" in line
    if case == "limit-0":
        assert "--limit" in line and "'0'" in line


# -- 7. image size ------------------------------------------------------------------------------
def test_07_image_size_settings_agree_or_say_so(tmp, classes, capsys):
    assert load_recipe("supervised", overrides=["data.image_size=48"]).backbone.img_size == 48
    assert load_recipe("supervised", overrides=["backbone.img_size=48"]).data.image_size == 48
    both = load_recipe("supervised", overrides=["backbone.img_size=48", "data.image_size=64"])
    assert (both.backbone.img_size, both.data.image_size) == (48, 64)
    code, out, err = cli(capsys, "pretrain", "--recipe", TINY, "--out", tmp / "size", "--steps", "2", *FAST,
                         sources(f"folder:{classes}"), "data.image_size=24")
    assert code == 0, err[-2000:]
    assert "note: images are read at data.image_size=24 and their views resized to backbone.img_size=16" in out


# -- 8. symlink loops ----------------------------------------------------------------------------
def test_08_a_symlink_loop_is_read_once(tmp, capsys):
    root = class_root(tmp / "loop", n=2, classes="ab")
    (root / "a" / "up").symlink_to("..")
    src = build_source(f"folder:{root}")
    assert len(src) == 4
    assert [(Path(src.locate(i)).parent.name, src.get(i)["label"]) for i in range(4)] == [("a", 0), ("a", 0),
                                                                                            ("b", 1), ("b", 1)]


# -- 9. devices ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["pretrain", "eval", "finetune"])
def test_09_an_unusable_device_is_one_line(command, run, classes, capsys):
    base = {"pretrain": ["pretrain", "--recipe", TINY, "--out", run.parent / "dev", "--steps", "2", "--no-progress",
                         sources(f"folder:{classes}")],
            "eval": ["eval", "--checkpoint", run, "--task", "knn", "--dataset", f"folder:{classes}", "--no-progress"],
            "finetune": ["finetune", "--checkpoint", run, "--dataset", f"folder:{classes}", "--steps", "1",
                         "--out", run.parent / "ft-dev", "--no-progress"]}[command]
    devices = ["tpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        line = refused(capsys, *base, "--device", device)
        assert f"--device {device}" in line
    assert not (run.parent / "dev").exists()


def test_10_a_limit_too_small_for_the_linear_probe_is_refused(classes, capsys):
    line = refused(capsys, "eval", "--checkpoint", "pixels", "--task", "linear", "--dataset", f"folder:{classes}",
                   "--limit", "1", "--no-progress")
    assert "--limit 1" in line and "linear" in line


@needs_data
@pytest.mark.parametrize("task", ["knn", "linear", "zeroshot"])
def test_11_a_set_without_labels_is_refused_for_label_tasks(task, clip_run, capsys):
    checkpoint = clip_run if task == "zeroshot" else "pixels"
    line = refused(capsys, "eval", "--checkpoint", checkpoint, "--task", task, "--dataset", "emoji:none",
                   "--limit", "100", "--no-progress")
    assert "emoji:none" in line and "labels" in line


def test_12_a_negative_limit_is_refused(capsys):
    line = refused(capsys, "eval", "--checkpoint", "pixels", "--task", "knn", "--dataset", "digits", "--limit", "-5")
    assert "--limit" in line and "-5" in line


# -- 13. output paths checked before any work -------------------------------------------------------
def test_13_json_outputs_are_checked_before_any_work(tmp, run, classes, capsys):
    folder = tmp / "a-folder"
    folder.mkdir()
    code, out, err = cli(capsys, "eval", "--checkpoint", "pixels", "--task", "knn", "--dataset", f"folder:{classes}",
                         "--json", folder, "--no-progress")
    assert code == 2 and "knn on" not in out and "--json" in error_line(err)
    not_a_folder = tmp / "a-file"
    not_a_folder.write_text("")
    line = refused(capsys, "finetune", "--checkpoint", run, "--dataset", f"folder:{classes}", "--steps", "1",
                   "--out", tmp / "ft13", "--json", not_a_folder / "r.json", "--no-progress", "--device", "cpu")
    assert "--json" in line and not (tmp / "ft13").exists()


# -- 14. sizes far beyond memory --------------------------------------------------------------------
@pytest.mark.parametrize("case", ["data.image_size=100000", "backbone.img_size=100000", "eval --image-size 4000"])
def test_14_a_size_far_beyond_memory_is_refused_with_an_estimate(case, tmp, classes, capsys):
    if case.startswith("eval"):
        from conftest import have_builtin_data

        if not have_builtin_data():
            pytest.skip("built-in data not fetched")
        args = ["eval", "--checkpoint", "pixels", "--task", "knn", "--dataset", "fashion-mnist", "--image-size",
                "4000", "--no-progress"]
    else:
        args = ["pretrain", "--recipe", TINY, "--out", tmp / "huge", "--steps", "2", *FAST,
                sources(f"folder:{classes}"), case]
    line = refused(capsys, *args)
    assert re.search(r"\d+(\.\d+)? [GTP]iB", line), line
    assert ("--image-size" if case.startswith("eval") else case.split("=")[0]) in line, line
    assert not (tmp / "huge").exists()


# -- 15, 16. how a run ends ---------------------------------------------------------------------
def test_15_a_failed_start_leaves_no_run_folder(tmp, capsys):
    out = tmp / "failed-start"
    refused(capsys, "pretrain", "--recipe", TINY, "--out", out, "--steps", "2", *FAST,
            sources(f"folder:{tmp / 'no-such-folder'}"))
    assert not out.exists()
    out.mkdir()  # a folder the user made: kept, without a stale lock
    refused(capsys, "pretrain", "--recipe", TINY, "--out", out, "--steps", "2", *FAST,
            sources(f"folder:{tmp / 'no-such-folder'}"))
    assert out.is_dir() and list(out.iterdir()) == []


def test_16_a_run_whose_steps_were_all_non_finite_fails(tmp, classes, monkeypatch, capsys):
    from m3i.objective import Objective

    real = Objective.forward

    def nan_forward(self, batch, views=None):
        out = real(self, batch, views)
        out["loss"] = out["loss"] + float("nan")
        return out

    monkeypatch.setattr(Objective, "forward", nan_forward)
    code, _, err = cli(capsys, "pretrain", "--recipe", TINY, "--out", tmp / "nan", "--steps", "2", *FAST,
                       sources(f"folder:{classes}"))
    assert code == 1
    line = error_line(err)
    assert "no checkpoint was written: 2 of the 2 steps" in line


# -- 17, 18. command-line forms ----------------------------------------------------------------------
def test_17_overrides_may_come_before_options(tmp, classes, capsys):
    out = tmp / "intermixed"
    code, _, err = cli(capsys, "pretrain", "--recipe", TINY, "train.lr=2e-3", "--out", out, "--steps", "2",
                       "data.batch_size=4", *FAST, sources(f"folder:{classes}"))
    assert code == 0, err[-2000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["train"]["lr"], saved["data"]["batch_size"], saved["train"]["steps"]) == (2e-3, 4, 2)


def test_18_every_path_form_of_a_checkpoint_is_accepted(run, classes, capsys):
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    for form in (run, run / "checkpoints", run / "checkpoints" / "latest", latest, latest / "model.safetensors"):
        code, out, err = cli(capsys, "eval", "--checkpoint", form, "--task", "knn", "--dataset", f"folder:{classes}",
                             "--no-progress", "--device", "cpu")
        assert code == 0, (form, err[-2000:])
        assert "knn on" in out


# -- 19. messages ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case, words", [
    ("data.sources.0.spec=digits", ["data.sources", "data.sources=[{spec: digits}]"]),
    ("stray", ["stray.png", "beside"]),
    ("train.min_lr=0.1", ["train.min_lr", "train.lr"]),
    ("terms.0.weight=-1", ["terms.0.weight", "greater than or equal to 0"]),
])
def test_19_mistakes_get_a_message_that_says_what_is_wrong(case, words, tmp, capsys):
    data = class_root(tmp / ("c19-stray" if case == "stray" else "c19"), n=4)
    if case == "stray":
        (data / "stray.png").write_bytes(png((0, 0, 0), 0))
        args = [sources(f"folder:{data}")]
    elif case.startswith("data.sources.0"):
        args = [case]
    else:
        args = [sources(f"folder:{data}"), case]
    recipe = "supervised" if case.startswith("data.sources.0") else TINY
    line = refused(capsys, "pretrain", "--recipe", recipe, "--out", tmp / "m19", "--steps", "2", *FAST, *args)
    for w in words:
        assert w in line, line


# -- 20. output ----------------------------------------------------------------------------------
@pytest.mark.slow  # gloo ranks
def test_20_progress_and_warnings_are_printed_once_and_only_when_asked(tmp, captioned, two_ranks, capsys):
    _, _, logs = two_ranks  # bars on: rank 0 alone shows the text embeddings
    assert "text embeddings" in logs["0.err"] and "text embeddings" not in logs["1.err"]
    code, _, err = cli(capsys, "pretrain", "--recipe", "clip", "--out", tmp / "np", "--steps", "1", *FAST,
                       "backbone.name=vit_nano", "backbone.depth=1", "data.batch_size=8", sources(f"manifest:{captioned}"))
    assert code == 0 and "text embeddings" not in err, err[-2000:]
    rows = [{"path": "x.png", "caption": "x"}] * 10 + [{"caption": "no path"}]
    man = write_jsonl(tmp / "one-bad-row.jsonl", rows)
    (tmp / "x.png").write_bytes(png((1, 2, 3), 0))
    proc = run_m3i("pretrain", "--recipe", TINY, "--out", str(tmp / "w20"), *FAST, sources(f"manifest:{man}"))
    assert proc.returncode == 2, proc.stderr[-2000:]  # unlabelled data for a label term
    assert proc.stderr.count("1 of 11 rows dropped") == 1, proc.stderr


# -- 21. file modes ------------------------------------------------------------------------------
def test_21_checkpoint_weights_are_readable_like_every_other_file(run, tmp, capsys):
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    expected = mode(run / "config.yaml")
    ck = ckpt.find(run)
    assert {p.name: mode(p) for p in ck.iterdir()} == {n: expected for n in ckpt.CHECKPOINT_FILES}
    assert cli(capsys, "export", "--checkpoint", run, "--out", tmp / "timm.safetensors")[0] == 0
    assert mode(tmp / "timm.safetensors") == expected


# -- 22. stale text --------------------------------------------------------------------------------
def test_22_docs_and_help_say_what_m3i_does(capsys):
    for doc in ("docs/finetune.md", "docs/scale.md"):
        text = (ROOT / doc).read_text()
        assert not re.findall(r"[\w.]+\.pth?\b", text), doc  # checkpoints hold no pickle
    for doc in ROOT.glob("docs/*.md"):
        for name in re.findall(r"m3i recipe's backbone \(`(\w+)`", doc.read_text()):
            assert name == load_recipe("m3i").backbone.name, (doc, name)
    code, out, _ = cli(capsys, "eval", "--help")
    from m3i.eval.run import DATASETS

    assert code == 0 and all(d in " ".join(out.split()) for d in DATASETS) and "digits" in DATASETS
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    assert compare.settings(["--finetune-steps", "0"]).finetune_steps == 0
    assert compare.settings([]).finetune_steps == 60
    with pytest.raises(SystemExit):
        compare.settings(["--finetune-steps", "-1"])
