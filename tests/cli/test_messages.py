"""What the command line says beside its work: a run shorter than its warm-up is trained (the
warm-up scaled with ``--steps``, or cut short), with one line saying so; m3i's own warnings are one
``m3i: warning: ...`` line each while other libraries' keep Python's form; a stale shard index is
reported once; a misspelt key, kind, recipe or backbone gets the closest valid name."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clikit import ENV, FAST, TINY, class_root, error_line, metrics, png, shard, sources
from m3i.cli import main
from m3i.config import RECIPE_DIR

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def warnings_in(err: str) -> list[str]:
    """The warning lines of m3i's stderr; Python's own form of a warning (file:line: UserWarning) fails."""
    assert "UserWarning" not in err and "Traceback" not in err, err[-3000:]
    return [ln for ln in err.splitlines() if ln.startswith("m3i: warning: ")]


def dry_run_steps(out: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith("steps:"))


# -- a run shorter than its warm-up --------------------------------------------------------------
def test_steps_alone_scale_the_recipes_warm_up(tmp_path, capsys):
    """The issue's command: the m3i recipe (warm-up 100 of 1123 steps) with --steps 12."""
    train = yaml.safe_load((RECIPE_DIR / "m3i.yaml").read_text())["train"]
    expected = max(1, round(train["warmup_steps"] * 12 / train["steps"]))
    code, out, err = cli(capsys, "pretrain", "--recipe", "m3i", "--steps", "12", "--dry-run")
    assert code == 0, err[-3000:]
    assert dry_run_steps(out) == f"steps:           12 ({expected} of warm-up)"
    assert warnings_in(err) == [
        f"m3i: warning: train.steps 12 is shorter than the recipe's warm-up (train.warmup_steps "
        f"{train['warmup_steps']} of its {train['steps']} steps): the warm-up is scaled with the steps, to "
        f"{expected}; set train.warmup_steps to choose another"]


def test_a_recipes_warm_up_is_scaled_in_proportion(tmp_path, capsys):
    recipe = yaml.safe_load(Path(TINY).read_text())
    recipe["train"].update(steps=100, warmup_steps=30)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, out, err = cli(capsys, "pretrain", "--recipe", path, "train.steps=20", "--dry-run")
    assert code == 0, err[-3000:]
    assert dry_run_steps(out) == "steps:           20 (6 of warm-up)"  # 30 of 100 -> 6 of 20
    assert len(warnings_in(err)) == 1
    # a run at least as long as its warm-up keeps it, without a word
    code, out, err = cli(capsys, "pretrain", "--recipe", path, "train.steps=30", "--dry-run")
    assert code == 0 and dry_run_steps(out) == "steps:           30 (30 of warm-up)" and not warnings_in(err)


def test_a_warm_up_given_with_the_steps_is_cut_short_and_the_run_trains(tmp_path, capsys):
    """Both given: the run ends inside the warm-up, its learning rate rising linearly as the
    schedule says, lr · (s + 1) / (warmup + 1) after step s."""
    data = class_root(tmp_path / "data", n=4)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "pretrain", "--recipe", TINY, "--out", out, "--steps", "2", "train.warmup_steps=5",
                       *FAST, sources(f"folder:{data}"))
    assert code == 0, err[-3000:]
    assert warnings_in(err) == ["m3i: warning: train.warmup_steps 5 is more than train.steps 2: the warm-up is cut "
                                "short, the run ending at 33% of train.lr"]
    lr = yaml.safe_load(Path(TINY).read_text())["train"]["lr"]
    logged = {m["step"]: m["lr"] for m in metrics(out)}
    assert logged.keys() == {1, 2}
    for step, value in logged.items():
        assert math.isclose(value, lr * (step + 1) / 6, rel_tol=1e-9), (step, value)


# -- warnings -----------------------------------------------------------------------------------
@pytest.mark.slow  # command lines in child processes
def test_m3i_warnings_are_one_line_and_other_warnings_keep_their_form(tmp_path):
    (tmp_path / "noisy_plugin.py").write_text("import warnings\nwarnings.warn('noisy plugin: a word of its own')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-m", "m3i.cli", "--plugin", "noisy_plugin", "pretrain", "--recipe", "m3i",
                           "--steps", "12", "--dry-run"], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    own = [ln for ln in lines if "warm-up" in ln]
    assert len(own) == 1 and own[0].startswith("m3i: warning: train.steps 12 is shorter"), proc.stderr
    assert f"{tmp_path / 'noisy_plugin.py'}:2: UserWarning: noisy plugin: a word of its own" in lines, proc.stderr


@pytest.mark.slow  # command lines in child processes
def test_a_stale_shard_index_is_reported_once(tmp_path):
    for k in range(2):
        shard(tmp_path / f"{k:02d}.tar", [(f"s{k}{i}", png((200, 10, 10), i), "a red square", "0") for i in range(3)])
    index = [sys.executable, "-m", "m3i.cli", "data", "index", str(tmp_path / "{00..01}.tar"), "--no-progress"]
    assert subprocess.run(index, env=ENV, capture_output=True, text=True, timeout=600).returncode == 0
    os.utime(tmp_path / "01.tar", ns=(1, 1))  # the same size, another mtime: stale
    proc = subprocess.run(index, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stale = [ln for ln in proc.stderr.splitlines() if "stale" in ln]
    assert len(stale) == 1 and stale[0].startswith("m3i: warning: shard index "), proc.stderr
    assert f"1 of 2 shards changed since it was built (first: {tmp_path / '01.tar'}" in stale[0]


# -- did you mean --------------------------------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["train.stpes=5"], "train.stpes: unknown key (did you mean 'steps'?)"),
    (["trian.steps=5"], "trian: unknown key (did you mean 'train'?)"),
    (["views.mask.ratoi=0.3"], "views.mask.ratoi: unknown key (did you mean 'ratio'?)"),
    (["terms.0.estimator.temperatur=0.1"],
     "terms.0.estimator.temperatur: unknown key (not a setting of kind 'boltzmann') (did you mean 'temperature'?)"),
    (["terms.0.estimator.kind=boltzman"], "terms.0.estimator.kind: expected one of 'boltzmann', 'gaussian', "
                                          "'unigrad', 'cross_entropy', 'koleo', 'sigmoid', 'tokens' (got 'boltzman') "
                                          "(did you mean 'boltzmann'?)"),
    (["train.precision=bf61"], "(got 'bf61') (did you mean 'bf16'?)"),
    (["backbone=vit_nan"], "backbone.name: unknown backbone 'vit_nan' (did you mean 'vit_nano'?); expected one of"),
])
def test_a_misspelt_override_gets_the_closest_name(args, says, capsys):
    code, _, err = cli(capsys, "pretrain", "--recipe", "supervised", "--dry-run", *args)
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"m3i pretrain: error: {RECIPE_DIR / 'supervised.yaml'} + overrides: ") and says in line, line


def test_a_misspelt_key_of_a_config_file_or_a_recipe_name_gets_the_closest_name(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("data:\n  batch_sise: 64\n")
    code, _, err = cli(capsys, "pretrain", "--recipe", "supervised", "--config", config, "--dry-run")
    assert code == 2
    assert error_line(err).endswith(f"+ {config}: data.batch_sise: unknown key (did you mean 'batch_size'?)")
    code, _, err = cli(capsys, "pretrain", "--recipe", "supervized", "--dry-run")
    assert code == 2
    assert error_line(err).startswith("m3i pretrain: error: unknown recipe 'supervized' (did you mean 'supervised'?); "
                                      "expected one of ")


def test_a_misspelt_data_source_kind_gets_the_closest_name(capsys):
    code, _, err = cli(capsys, "data", "info", "fashion-mnst:train")
    assert code == 2
    assert error_line(err).startswith("m3i data: error: unknown data source spec 'fashion-mnst:train' (kind "
                                      "'fashion-mnst' not recognised (did you mean 'fashion-mnist'?)); accepted forms: ")
