"""Experiment trackers: every term's loss, the learning rate, img/s and the skipped counts reach
W&B (offline files) and MLflow (a file store) beside metrics.jsonl, with the resolved recipe as the
run's config; a tracker that is not installed, fails to import, has no key or cannot start is
named in one line with what to do, and leaves no run folder; one that fails mid-run is dropped."""
import json
import os
import socket
import subprocess
import sys

import pytest

from m3i.cli import main
from m3i.config import load_recipe
from m3i.device import resolve_precision
from m3i.train import loop, trackers
from conftest import HANG, needs_data

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
def test_wandb_offline_and_mlflow_file_store_get_every_logged_value(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    for key in ("WANDB_MODE", "WANDB_SILENT"):
        monkeypatch.setenv(key, "offline" if key == "WANDB_MODE" else "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = load_recipe("byol", overrides=SMALL + ["train.report_to=[tensorboard, wandb, mlflow]"])
    run = tmp_path / "run"
    loop.pretrain(recipe, run, device="cpu", progress=False)
    said = capsys.readouterr().out
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = LOGGED + [t.name for t in recipe.terms] + ["ema_momentum"]

    # W&B: the offline run's file (what `wandb sync` uploads)
    [offline] = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert f"wandb:       {offline.parent} (offline; `wandb sync` uploads it)" in said.splitlines()
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
    assert f"mlflow:      run {run_id} in {(run / 'mlruns').resolve().as_uri()}" in said.splitlines()

    assert list((run / "tensorboard").glob("events.*"))
    assert f"tensorboard: {run / 'tensorboard'}" in said.splitlines()


def test_a_tracker_not_installed_is_named_with_its_extra(tmp_path, monkeypatch, capsys):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    assert main(["pretrain", "--recipe", "byol", "--out", str(tmp_path / "run"), "--no-progress",
                 *SMALL, "train.report_to=[wandb]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["m3i pretrain: error: train.report_to: 'wandb' is not installed; install it with "
                   "pip install 'm3i[wandb]'"]
    assert not (tmp_path / "run").exists()  # refused before any work


def no_wandb_key(monkeypatch, home):
    """No W&B key anywhere W&B looks (the environment, a netrc file) and no offline mode."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))


def test_wandb_without_a_key_is_refused_before_anything_is_built(tmp_path, monkeypatch, capsys):
    no_wandb_key(monkeypatch, tmp_path / "home")
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", "byol", "--out", str(run), "--no-progress", *SMALL,
                 "train.report_to=[tensorboard, wandb]"]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        "m3i pretrain: error: train.report_to: 'wandb' has no API key (no WANDB_API_KEY, no `wandb login` entry for "
        "api.wandb.ai in ~/.netrc) and WANDB_MODE is not offline; set WANDB_API_KEY, run `wandb login`, or set "
        "WANDB_MODE=offline to log on disk (`wandb sync` uploads it later)"]
    assert out == ""  # refused before the device and the precision were even resolved
    assert not run.exists()
    # `wandb login`'s netrc entry, or offline mode, is a key enough: the check passes
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    trackers.preflight(["wandb"])
    (tmp_path / "home" / ".netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    trackers.preflight(["wandb"])


@pytest.mark.slow
def test_a_tracker_that_fails_to_import_is_named(tmp_path):
    """An install whose own imports fail (a package of the wrong version beside it, say): one line,
    no traceback, no run folder."""
    broken = tmp_path / "site" / "wandb"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError(\"cannot import name 'Record' from 'wandb.proto'\")\n")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "site")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    done = subprocess.run([sys.executable, "-m", "m3i.cli", "pretrain", "--recipe", "byol", "--out", str(run),
                           "--no-progress", *SMALL, "train.report_to=[wandb]"], env=env, capture_output=True,
                          text=True, timeout=HANG)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "m3i pretrain: error: train.report_to: 'wandb' is installed but fails to import (ImportError: cannot import "
        "name 'Record' from 'wandb.proto'); reinstall it with pip install --force-reinstall 'm3i[wandb]', or leave "
        "it out of train.report_to"]
    assert not run.exists()


@pytest.fixture
def refusing_port():
    """A local port bound but not listening: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.mark.slow
@needs_data
def test_a_tracker_that_cannot_start_leaves_no_run_folder(tmp_path, monkeypatch, capsys, refusing_port):
    """MLflow's server does not answer: the model and data are built by then, but the start fails with
    one line naming it, TensorBoard (started first) is closed and its folder removed, and the next run
    into the same --out is not refused as a run "with no checkpoint yet"."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{refusing_port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = tmp_path / "run"
    args = ["pretrain", "--recipe", "byol", "--out", str(run), "--no-progress", *SMALL]
    assert main(args + ["train.report_to=[tensorboard, mlflow]"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("m3i pretrain: error: train.report_to: 'mlflow' could not start (MlflowException: ")
    assert line.endswith("); check MLFLOW_TRACKING_URI and that its server answers, or unset it to log into "
                         "RUN/mlruns, or leave it out of train.report_to")
    assert not run.exists()
    assert main(args) == 0 and (run / "checkpoints" / "latest").is_file()


@pytest.mark.slow
@needs_data
def test_a_tracker_that_fails_mid_run_is_dropped_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """TensorBoard's events file cannot be written from step 2 on (a full disk, say): a warning names
    it once, the run ends with its checkpoint, metrics.jsonl keeps every step."""
    real = trackers.TensorBoard.log

    def log(self, record, step):
        if step >= 2:
            raise OSError(28, "No space left on device")
        real(self, record, step)

    monkeypatch.setattr(trackers.TensorBoard, "log", log)
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", "byol", "--out", str(run), "--no-progress", *SMALL, "train.steps=3"]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warned == ["m3i: warning: train.report_to: 'tensorboard' failed at step 2 (OSError: [Errno 28] No space "
                      "left on device); it logs no more in this run, metrics.jsonl keeps every record"]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"


def _start_two_ranks(rank, out, port):
    from m3i.cli import main as m3i_main

    os.environ.update(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    assert m3i_main(["pretrain", "--recipe", "byol", "--out", out, "--no-progress", "--device", "cpu", *SMALL,
                     "train.report_to=[tensorboard, mlflow]"]) == 2


@pytest.mark.slow
@needs_data
def test_a_tracker_that_cannot_start_stops_every_rank(tmp_path, capfd, refusing_port):
    """On 2 ranks rank 0 alone starts the trackers: the other rank stops with it (rather than wait
    for rank 0 in a collective), both with one line."""
    pytest.importorskip("mlflow")
    from ranks import run_ranks

    run_ranks(_start_two_ranks, str(tmp_path / "run"), refusing_port, world=2, rendezvous="env")
    err = [ln for ln in capfd.readouterr().err.splitlines() if "m3i pretrain: error:" in ln]
    assert len(err) == 2, err
    assert err[0].startswith("[rank 0] m3i pretrain: error: train.report_to: 'mlflow' could not start (MlflowException: ")
    assert err[1] == ("[rank 1] m3i pretrain: error: train.report_to: a tracker could not start on rank 0 (its error "
                      "says which and what to do)")
    assert not (tmp_path / "run").exists()
