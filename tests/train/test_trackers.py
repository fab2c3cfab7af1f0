"""Experiment trackers: every term's loss, the learning rate, img/s and the skipped counts reach
W&B (offline files) and MLflow (a file store) beside metrics.jsonl, with the resolved recipe as the
run's config; a tracker that is not installed is named in one line with its extra."""
import json

import pytest

from m3i.cli import main
from m3i.config import load_recipe
from m3i.device import resolve_precision
from m3i.train import loop, trackers
from conftest import needs_data

SMALL = ["backbone.name=vit_nano", "backbone.depth=2", "data.batch_size=8", "data.num_workers=0",
         "train.log_every=1", "train.warmup_steps=1", "train.steps=2", "data.sources=[{spec: fashion-mnist}]"]
LOGGED = ["loss", "lr", "img_per_s", "skipped_images", "bad_steps"]


def read_wandb_file(path):
    """The records of an offline W&B run file: LevelDB's log format (32 KiB blocks of chunks with a
    7-byte header) after W&B's own 7-byte header, each record a ``wandb_internal_pb2.Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, part = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            r = pb.Record()
            r.ParseFromString(part + chunk if kind == 4 else chunk)
            records.append(r)
        part = chunk if kind == 2 else part + chunk if kind == 3 else b""
    return records


def item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


@pytest.mark.slow
@needs_data
def test_wandb_offline_and_mlflow_file_store_get_every_logged_value(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    for key in ("WANDB_MODE", "WANDB_SILENT"):
        monkeypatch.setenv(key, "offline" if key == "WANDB_MODE" else "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = load_recipe("byol", overrides=SMALL + ["train.report_to=[tensorboard, wandb, mlflow]"])
    run = tmp_path / "run"
    loop.pretrain(recipe, run, device="cpu", progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = LOGGED + [t.name for t in recipe.terms] + ["ema_momentum"]

    # W&B: the offline run's file (what `wandb sync` uploads)
    [offline] = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    records = read_wandb_file(offline)
    history = [{item_key(i): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [r["step"] for r in lines]
    for h, r in zip(history, lines):
        for k in keys:
            assert h[k] == pytest.approx(r[k]), k
    [config] = [{item_key(i): json.loads(i.value_json) for i in r.run.config.update} for r in records
                if r.WhichOneof("record_type") == "run"]
    # the run as it trained: train.precision auto resolved to this machine's format
    ran = recipe.model_dump(mode="json")
    ran["train"]["precision"] = resolve_precision("auto", "cpu")
    assert ran["train"]["precision"] in ("bf16", "fp32")
    assert config["name"] == "byol" and config["train"]["steps"] == 2 and config == {"_wandb": {}, **ran}

    # MLflow: the run's file store
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run / "mlruns").resolve().as_uri())
    run_id = (run / "mlruns" / "run_id").read_text().strip()
    for k in keys:
        history = client.get_metric_history(run_id, k)
        assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r[k])) for r in lines], k
    params = client.get_run(run_id).data.params
    assert params["name"] == "byol" and params["terms.0.estimator.kind"] == "gaussian"

    assert list((run / "tensorboard").glob("events.*"))


def test_a_tracker_not_installed_is_named_with_its_extra(tmp_path, monkeypatch, capsys):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    assert main(["pretrain", "--recipe", "byol", "--out", str(tmp_path / "run"), "--no-progress",
                 *SMALL, "train.report_to=[wandb]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["m3i pretrain: error: train.report_to: 'wandb' is not installed; install it with "
                   "pip install 'm3i[wandb]'"]
    assert not (tmp_path / "run").exists()  # refused before any work
