"""The loop's hooks as the command line meets them: the in-run monitor is built by the caller and
handed to the loop, before the run writes anything."""
from __future__ import annotations

from pathlib import Path

from faults.faultkit import image_folder

import pytest

from m3i.cli import main
from m3i.config import load_recipe
from m3i.train import loop

TINY = str(Path(__file__).parents[1] / "faults" / "tiny.yaml")  # a one-block ViT on 16 px, fp32, batch of 8


def test_a_monitor_with_no_data_set_is_refused_before_the_run_folder_is_made(tmp_path, capsys, one_thread):
    """train.eval_every on a folder, which names no data set to monitor on: one line saying what to
    set, exit 2, and no run folder left behind (the monitor's data load before anything is written;
    it once left config.yaml, classes.json and tensorboard/ behind)."""
    data, out = image_folder(tmp_path / "data"), tmp_path / "run"
    code = main(["pretrain", "--recipe", TINY, "--out", str(out), "--steps", "2", "--no-progress", "--device", "cpu",
                 f"data.sources=[{{spec: 'folder:{data}'}}]", "train.eval_every=1"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "m3i pretrain: error: train.eval_every: no data set to monitor on; set train.eval_knn (a data set as "
        "`m3i eval --dataset` takes: fashion-mnist, emoji:category, folder:PATH)")
    assert not out.exists()


def test_pretrain_with_monitors_asked_for_but_none_given_is_refused(tmp_path):
    """The library's pretrain builds no monitor of its own (train/ imports no evaluation): a recipe
    that asks for one without the caller handing one over is refused before any work."""
    recipe = load_recipe(TINY, overrides=["train.eval_every=5", "train.eval_knn=fashion-mnist"])
    with pytest.raises(ValueError, match=r"^train.eval_every: 5, but pretrain was given no monitor; pass "
                                         r"monitor=m3i.eval.monitor.Monitor"):
        loop.pretrain(recipe, tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run").exists()
