"""Experiment trackers beside ``metrics.jsonl``: ``train.report_to: [tensorboard, wandb, mlflow]``.

Each gets every logged record (each term's loss, the learning rate, img/s, the skipped counts,
the monitors' scores) at its step, and the resolved recipe as the run's config. TensorBoard is a
dependency; W&B and MLflow are extras (``pip install 'm3i[wandb]'``, ``'m3i[mlflow]'``):

- W&B logs under ``RUN/wandb``; ``WANDB_MODE=offline`` keeps it on disk (``wandb sync`` uploads it
  later), ``WANDB_PROJECT`` names the project (default ``m3i``). A resumed run continues the same W&B run.
- MLflow logs to ``$MLFLOW_TRACKING_URI``, by default a file store in ``RUN/mlruns``
  (``mlflow ui --backend-store-uri RUN/mlruns``), experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``m3i``.

A tracker that cannot start is found before the run builds anything where that can be known
(:func:`preflight`: installed, importable, a W&B key or offline mode, a tracking URI MLflow takes);
one that fails when it starts (a key the server refuses, no network) stops the run with one line and
leaves the run folder as it found it; one that fails later is dropped with a warning, and the run
goes on (``metrics.jsonl`` keeps every record).
"""
from __future__ import annotations

import importlib
import importlib.util
import netrc
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from urllib.parse import urlparse

import yaml

from .. import runs

EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}  # tracker: (module, extra)
WANDB_OFF = ("offline", "disabled", "dryrun")  # WANDB_MODE values that need no key


class TrackerError(ValueError):
    """A tracker of ``train.report_to`` cannot start (the message names it and what to do)."""


def check_installed(report_to: list[str]) -> None:
    """Raise TrackerError, one line naming the extra, for a tracker asked for but not installed,
    or installed but failing to import."""
    for name in dict.fromkeys(report_to):
        if name not in EXTRAS:
            continue
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"train.report_to: {name!r} is not installed; install it with "
                               f"pip install 'm3i[{extra}]'")
        try:
            importlib.import_module(module)
        except Exception as e:  # a broken install raises whatever its own imports raise
            raise TrackerError(f"train.report_to: {name!r} is installed but fails to import ({_line(e)}); "
                               f"reinstall it with pip install --force-reinstall 'm3i[{extra}]', or leave it out "
                               f"of train.report_to") from None


def preflight(report_to: list[str]) -> None:
    """Before a run builds anything: every tracker asked for is installed and imports, W&B has a key
    or logs offline, MLflow takes ``$MLFLOW_TRACKING_URI``; else TrackerError, one line."""
    check_installed(report_to)
    if "wandb" in report_to:
        check_wandb_key()
    if "mlflow" in report_to:
        check_mlflow_uri()


def check_wandb_key() -> None:
    """W&B needs an API key (``WANDB_API_KEY``, or ``wandb login``'s entry in ~/.netrc), unless
    ``WANDB_MODE`` keeps it off the network."""
    if os.environ.get("WANDB_MODE", "").lower() in WANDB_OFF:
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    if _netrc_has(host):
        return
    raise TrackerError(f"train.report_to: 'wandb' has no API key (no WANDB_API_KEY, no `wandb login` entry for {host} "
                       f"in ~/.netrc) and WANDB_MODE is not offline; set WANDB_API_KEY, run `wandb login`, or set "
                       f"WANDB_MODE=offline to log on disk (`wandb sync` uploads it later)")


def _netrc_has(host: str) -> bool:
    """Whether the netrc file W&B reads ($NETRC, else ~/.netrc or ~/_netrc) holds ``host``."""
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for path in (Path(p).expanduser() for p in paths):
        try:
            if netrc.netrc(str(path)).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def check_mlflow_uri() -> None:
    """MLflow builds its store from ``$MLFLOW_TRACKING_URI`` without a request to it: a scheme it
    does not take, or a store it refuses, is found here."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return  # the run's own file store
    _allow_file_store(uri)
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri)
    except Exception as e:
        raise TrackerError(f"train.report_to: 'mlflow' cannot log to MLFLOW_TRACKING_URI={uri} ({_line(e)}); set it "
                           f"to a tracking server or a store MLflow takes, or unset it to log into RUN/mlruns") from None


def _allow_file_store(uri: str) -> None:
    """A file store (the run's own, or one ``$MLFLOW_TRACKING_URI`` names) needs MLflow 3's opt-in."""
    if urlparse(uri).scheme in ("", "file"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _line(e: BaseException) -> str:
    """An exception as a short line: its type and the first 200 characters of its message."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}" if text else type(e).__name__


def numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def flatten(config, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys (``terms.0.estimator.kind``)."""
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    else:
        return {prefix: str(config)}
    out: dict[str, str] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class TensorBoard:
    FOLDER = runs.TENSORBOARD
    ADVICE = "check that the run folder is writable"

    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = run_dir / runs.TENSORBOARD
        self.writer = SummaryWriter(str(self.folder), purge_step=resume_step or None)
        if not resume_step:
            self.writer.add_text("recipe", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    def log(self, record: dict, step: int) -> None:
        for k, v in numbers(record).items():
            self.writer.add_scalar(k, v, step)

    def where(self) -> str:
        return f"tensorboard: {self.folder}"

    def close(self) -> None:
        self.writer.close()


class WandB:
    FOLDER = "wandb"
    ADVICE = ("check WANDB_API_KEY (or `wandb login`) and the network, or set WANDB_MODE=offline to log on disk "
              "(`wandb sync` uploads it later)")

    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        import wandb

        id_file = run_dir / self.FOLDER / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "m3i"), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config)

    def log(self, record: dict, step: int) -> None:
        self.run.log(numbers(record), step=step)

    def where(self) -> str:
        if os.environ.get("WANDB_MODE", "").lower() == "disabled":
            return "wandb:       nothing logged (WANDB_MODE=disabled)"
        if self.run.offline:  # what `wandb sync` takes: the run's offline folder
            return f"wandb:       {Path(self.run.dir).parent} (offline; `wandb sync` uploads it)"
        return f"wandb:       {self.run.url or Path(self.run.dir).parent}"

    def close(self) -> None:
        self.run.finish()


class MLflow:
    FOLDER = "mlruns"
    ADVICE = "check MLFLOW_TRACKING_URI and that its server answers, or unset it to log into RUN/mlruns"

    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / self.FOLDER).resolve().as_uri()
        _allow_file_store(uri)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.client, self.Metric, self.uri = MlflowClient(uri), Metric, uri
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "m3i")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        id_file = run_dir / self.FOLDER / "run_id"
        if resume_step and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            return
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id)
        params = [Param(k[:250], v[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def where(self) -> str:
        return f"mlflow:      run {self.run_id} in {self.uri}"

    def log(self, record: dict, step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(k, v, now, step) for k, v in numbers(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_trackers(report_to: list[str], run_dir: Path, config: dict, resume_step: int) -> list:
    """Start every tracker of ``report_to``. One that fails to start closes those already started,
    removes the folders this start made, and raises TrackerError naming it and what to do."""
    names = list(dict.fromkeys(report_to))
    check_installed(names)
    made = [run_dir / TRACKERS[n].FOLDER for n in names if not (run_dir / TRACKERS[n].FOLDER).exists()]
    opened: list = []
    for name in names:
        try:
            opened.append(TRACKERS[name](run_dir, config, resume_step))
        except Exception as e:
            close_all(opened)
            for folder in made:
                shutil.rmtree(folder, ignore_errors=True)
            raise TrackerError(f"train.report_to: {name!r} could not start ({_line(e)}); {TRACKERS[name].ADVICE}, "
                               f"or leave it out of train.report_to") from None
    return opened


def close_all(opened: list) -> list[str]:
    """Close every tracker, whatever one of them raises -> a line for each that failed."""
    failed = []
    for t in opened:
        try:
            t.close()
        except Exception as e:
            failed.append(f"train.report_to: {tracker_name(t)!r} failed while closing ({_line(e)})")
    return failed


def tracker_name(tracker) -> str:
    return next(n for n, cls in TRACKERS.items() if isinstance(tracker, cls))


def log_all(opened: list, record: dict, step: int) -> list:
    """Log ``record`` to every tracker; one that fails is warned about once and dropped (the run,
    and metrics.jsonl, go on) -> the trackers still logging."""
    kept = []
    for t in opened:
        try:
            t.log(record, step)
        except Exception as e:
            warnings.warn(f"train.report_to: {tracker_name(t)!r} failed at step {step} ({_line(e)}); it logs no "
                          f"more in this run, metrics.jsonl keeps every record", RuntimeWarning, stacklevel=2)
            close_all([t])
            continue
        kept.append(t)
    return kept
