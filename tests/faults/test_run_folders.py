"""A run folder is never written over by accident: a second run into it, `--overwrite`, a
fine-tuning into its source run, a resume from an older checkpoint (a branch), a resume that
changes settings. Every run that trains is a real `m3i` child process; a refusal, decided before
any work, is `m3i`'s main in this process. "Unchanged" is byte for byte."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from faultkit import error_lines, final_weights, finished_run, image_folder, metrics, pretrain_args, run_m3i
from m3i.cli import main
from m3i.config import load_recipe
from m3i.runs import checkpoint as ckpt
from m3i import runs

STEPS = 6


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished run whose every step is checkpointed (the newest two are kept)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return finished_run(out, data, f"train.steps={STEPS}")


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run, and its bytes."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy, snapshot(copy)


def refused(capsys, *args: str) -> list[str]:
    """``m3i ARGS`` in this process: it must exit 2; its error lines."""
    assert main(list(args)) == 2
    return error_lines(capsys.readouterr().err)


@pytest.mark.slow
def test_a_second_run_into_a_finished_run_is_refused_and_the_folder_is_unchanged(data, run, capsys):
    folder, before = run
    assert refused(capsys, *pretrain_args(folder, data, "train.steps=3")) == [
        f"m3i pretrain: error: --out {folder}: holds a run of recipe 'tiny' at step {STEPS} of {STEPS}, finished; "
        f"continue it with --resume {folder} --steps N, choose another --out, or pass --overwrite to move it "
        f"aside (to {folder}.old-<time>)"]
    assert snapshot(folder) == before


@pytest.mark.slow
def test_overwrite_moves_the_old_run_aside_whole(data, run):
    folder, before = run
    fresh = run_m3i(*pretrain_args(folder, data, "train.steps=3", options=("--overwrite",)))
    assert fresh.returncode == 0, fresh.stderr
    aside = list(folder.parent.glob("run.old-*"))
    assert len(aside) == 1
    assert f"--out {folder}: held a run of recipe 'tiny' at step {STEPS} of {STEPS}, finished; moved it aside " \
           f"to {aside[0]}" in fresh.stdout
    assert snapshot(aside[0]) == before
    assert [r["step"] for r in metrics(folder)] == [1, 2, 3]  # the new run, from step 0


@pytest.mark.slow
def test_finetuning_into_its_source_run_is_refused_and_into_another_folder_leaves_it_unchanged(data, run, capsys):
    folder, before = run
    args = ["--dataset", f"folder:{data}", "--steps", "2", "--no-progress", "batch_size=8", "eval_batch_size=8",
            "precision=fp32"]
    for out in (folder, folder / "checkpoints"):
        [line] = refused(capsys, "finetune", "--checkpoint", str(folder), "--out", str(out), *args)
        assert line.startswith(f"m3i finetune: error: --out {out}: is the run fine-tuned from ({folder}); a "
                               f"fine-tuning is a run of its own: give it another --out (the default is runs/finetune/")
    assert snapshot(folder) == before

    tuned = folder.parent / "tuned"
    ok = run_m3i("finetune", "--checkpoint", str(folder), "--out", str(tuned), *args)
    assert ok.returncode == 0, ok.stderr
    assert snapshot(folder) == before
    assert refused(capsys, "finetune", "--checkpoint", str(folder), "--out", str(tuned), *args) == [
        f"m3i finetune: error: --out {tuned}: holds a fine-tuning run (2 steps); choose another --out, or pass "
        f"--overwrite to move it aside (to {tuned}.old-<time>)"]


@pytest.mark.slow
def test_a_resume_from_an_older_checkpoint_is_a_branch_in_a_folder_of_its_own(run, capsys):
    folder, before = run
    older = folder / "checkpoints" / f"step_{STEPS - 1:06d}"
    assert older.is_dir() and runs.newest(folder).name == f"step_{STEPS:06d}"
    assert refused(capsys, "pretrain", "--resume", str(older), "--no-progress") == [
        f"m3i pretrain: error: --resume {older}: step {STEPS - 1} is older than the run's newest checkpoint "
        f"(step_{STEPS:06d}); resuming it there would rewind {folder}. A branch is a new run: give it a folder of "
        f"its own, e.g. --out {folder}-from-step_{STEPS - 1:06d}"]
    assert snapshot(folder) == before

    branch = folder.parent / "branch"
    done = run_m3i("pretrain", "--resume", str(older), "--out", str(branch), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert snapshot(folder) == before  # no checkpoint or log line of the original is touched
    # the branch re-trained the run's last step: the same weights, bit for bit
    ref, got = final_weights(folder), final_weights(branch)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert "note:" not in done.stdout


def test_pruning_keeps_the_runs_own_line_of_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    weights, state = {"w": torch.zeros(1)}, {"step": 0}
    ckpt.save(tmp_path, 8, weights, state)  # a later checkpoint of another line of this folder
    for step in (3, 4, 5):
        ckpt.save(tmp_path, step, weights, state)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_000004", "step_000005", "step_000008"]
    ckpt.save(tmp_path, 1000000, weights, state)  # a seventh digit sorts by number, not by name
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_000008", "step_1000000"]


@pytest.mark.slow
def test_a_resume_that_differs_says_what_differs_and_a_longer_run_is_a_continuation(run, capsys):
    folder, _ = run
    assert main(["pretrain", "--resume", str(folder), "--steps", str(STEPS + 1), "--no-progress"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert main(["pretrain", "--resume", str(folder), "--steps", str(STEPS + 2), "--no-progress",
                 "data.batch_size=4", "train.lr=5e-4"]) == 0
    assert [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note:")] == [
        "note: resuming with data.batch_size=4 (the run so far: 8)",
        "note: resuming with train.lr=0.0005 (the run so far: 0.001)",
        f"note: from step {STEPS + 1} on, the run trains with these changes: it is no longer the uninterrupted run"]


def test_changes_name_each_setting_of_a_nested_recipe():
    saved = load_recipe("m3i").model_dump(mode="json")
    now = load_recipe("m3i", overrides=["terms.1.estimator.temperature=0.5", "train.steps=500"])
    assert runs.changes(saved, now, 3) == [
        "note: resuming with terms.1.estimator.temperature=0.5 (the run so far: 0.1)",
        "note: from step 3 on, the run trains with these changes: it is no longer the uninterrupted run"]
    assert runs.changes(saved, load_recipe("m3i", overrides=["train.steps=500"]), 3) == []
    # a term added on resume is one setting, shown whole
    fewer = {**saved, "terms": saved["terms"][:3]}
    assert runs.changes(fewer, load_recipe("m3i"), 3) == [
        f"note: resuming with terms.3={json.dumps(saved['terms'][3])} (the run so far: (unset))",
        "note: from step 3 on, the run trains with these changes: it is no longer the uninterrupted run"]


@pytest.mark.slow
def test_describe_says_what_a_folder_holds(finished, data, tmp_path, capsys):
    assert runs.describe(tmp_path / "nothing") is None
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "slurm.out").write_text("a scheduler's log is no run")
    assert runs.describe(tmp_path / "logs") is None
    assert runs.describe(finished) == f"a run of recipe 'tiny' at step {STEPS} of {STEPS}, finished"
    partial = tmp_path / "partial"
    shutil.copytree(finished, partial)
    config = yaml.safe_load((partial / runs.CONFIG).read_text())
    config["train"]["steps"] = 100
    (partial / runs.CONFIG).write_text(yaml.safe_dump(config))
    assert runs.describe(partial) == f"a run of recipe 'tiny' at step {STEPS} of 100, not finished"
    shutil.rmtree(partial / "checkpoints")
    assert runs.describe(partial) == "a run of recipe 'tiny' with no checkpoint yet"
    assert refused(capsys, *pretrain_args(partial, data)) == [  # nothing to --resume
        f"m3i pretrain: error: --out {partial}: holds a run of recipe 'tiny' with no checkpoint yet; choose another "
        f"--out, or pass --overwrite to move it aside (to {partial}.old-<time>)"]
    assert refused(capsys, *pretrain_args(tmp_path / "logs" / "slurm.out", data)) == [
        f"m3i pretrain: error: --out {tmp_path / 'logs' / 'slurm.out'}: is a file, not a run folder; choose another "
        f"--out"]
