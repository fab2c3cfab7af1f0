"""Monitors (train.eval_every): k-NN and retrieval on held-out val splits, logged beside the losses,
without disturbing the run's random stream (a run with monitors trains, and resumes, exactly as
one without)."""
import json

import pytest

from m3i.config import load_recipe
from m3i.eval.monitor import Monitor, monitor_sets
from m3i.train import hooks, loop
from conftest import killed_and_resumed, needs_data

pytestmark = needs_data

SMALL = ["backbone.name=vit_nano", "backbone.depth=2", "data.batch_size=8", "data.num_workers=0",
         "train.log_every=1", "train.warmup_steps=1", "train.steps=4", "train.ckpt_every=2",
         "terms.0.target_encoder.tower=scratch", "terms.0.target_encoder.width=32", "terms.0.target_encoder.depth=1",
         "data.sources=[{spec: 'fashion-mnist:fit', captions: false}, {spec: 'emoji:fit', labels: false}]"]
MONITOR = ["train.eval_every=2", "train.eval_limit=40"]


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_monitors_are_picked_from_the_sources():
    assert monitor_sets(load_recipe("clip", overrides=SMALL)) == ("fashion-mnist", "emoji:category")
    assert monitor_sets(load_recipe("simclr", overrides=["data.sources=[{spec: emoji}]"])) == ("emoji:category", None)
    assert monitor_sets(load_recipe("mae", overrides=["data.sources=[{spec: 'folder:/x'}]"])) == (None, None)


@pytest.mark.slow
def test_monitor_scores_are_logged_and_change_nothing_else(tmp_path, monkeypatch):
    plain = load_recipe("clip", overrides=SMALL)
    watched = load_recipe("clip", overrides=SMALL + MONITOR)
    loop.pretrain(plain, tmp_path / "plain", device="cpu", progress=False)
    loop.pretrain(watched, tmp_path / "watched", device="cpu", progress=False, monitor=Monitor)
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "watched")
    assert [r["caption"] for r in a] == [r["caption"] for r in b]  # bitwise: the same random stream
    scored = [r for r in b if "monitor/knn_top1" in r]
    assert [r["step"] for r in scored] == [2, 4]
    for r in scored:
        assert 0.0 <= r["monitor/knn_top1"] <= 1.0 and 0.0 <= r["monitor/retrieval_i2t_R@1"] <= 1.0
    assert not any(k.startswith("monitor/") for r in a for k in r)

    # killed after the step-2 checkpoint and resumed: the same losses and scores, bit for bit
    killed_and_resumed(monkeypatch, watched, tmp_path / "resumed", 2, device="cpu", monitor=Monitor)
    c = metrics(tmp_path / "resumed")
    keys = ["caption", "monitor/knn_top1", "monitor/retrieval_i2t_R@1"]
    assert [[r.get(k) for k in keys] for r in c] == [[r.get(k) for k in keys] for r in b]


class Clock:
    """The trainer's clock (hooks.py): the real one, plus the time added where a test says a part of the run took long."""

    def __init__(self):
        import time

        self.real, self.added = time.perf_counter, 0.0

    def perf_counter(self) -> float:
        return self.real() + self.added


def taking(clock: Clock, seconds: float, work):
    def slow(*a, **k):
        out = work(*a, **k)
        clock.added += seconds
        return out
    return slow


@pytest.mark.slow
def test_img_per_s_is_training_alone_the_monitors_time_logged_apart(tmp_path, monkeypatch):
    """Each monitor pass and each checkpoint write is made to take 10^6 s on the trainer's clock: were
    they in the training time, img/s could be no more than the images over 10^6 s."""
    clock, long = Clock(), 1e6
    monkeypatch.setattr(hooks, "time", clock)
    monkeypatch.setattr(Monitor, "__call__", taking(clock, long, Monitor.__call__))
    monkeypatch.setattr(hooks, "save_checkpoint", taking(clock, long, hooks.save_checkpoint))
    loop.pretrain(load_recipe("clip", overrides=SMALL + MONITOR), tmp_path / "run", device="cpu", progress=False,
                  monitor=Monitor)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        images = r["step"] * 8
        # 10^5 s for a few steps of a tiny model: a guard against a hang, not a speed
        assert r["img_per_s"] > images / 1e5, r
    assert [r["step"] for r in rows if "monitor_s" in r] == [2, 4]
    assert all(r["monitor_s"] >= long for r in rows if "monitor_s" in r)
