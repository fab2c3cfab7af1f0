"""Experiment trackers beside ``metrics.jsonl``: ``train.report_to: [tensorboard, wandb, mlflow]``.

Each gets every logged record (each term's loss, the learning rate, img/s, the skipped counts,
the monitors' scores) at its step, and the resolved recipe as the run's config. TensorBoard is a
dependency; W&B and MLflow are extras (``pip install 'm3i[wandb]'``, ``'m3i[mlflow]'``):

- W&B logs under ``RUN/wandb``; ``WANDB_MODE=offline`` keeps it on disk (``wandb sync`` uploads it
  later), ``WANDB_PROJECT`` names the project (default ``m3i``). A resumed run continues the same W&B run.
- MLflow logs to ``$MLFLOW_TRACKING_URI``, by default a file store in ``RUN/mlruns``
  (``mlflow ui --backend-store-uri RUN/mlruns``), experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``m3i``.
"""
from __future__ import annotations

import importlib.util
import os
import time
import uuid
from pathlib import Path

import yaml

from . import runs

EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}  # tracker: (module, extra)


def check_installed(report_to: list[str]) -> None:
    """Raise ValueError, one line naming the extra, for a tracker asked for but not installed."""
    for name in report_to:
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name][0]) is None:
            raise ValueError(f"train.report_to: {name!r} is not installed; install it with "
                             f"pip install 'm3i[{EXTRAS[name][1]}]'")


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
    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / runs.TENSORBOARD), purge_step=resume_step or None)
        if not resume_step:
            self.writer.add_text("recipe", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    def log(self, record: dict, step: int) -> None:
        for k, v in numbers(record).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        import wandb

        id_file = run_dir / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "m3i"), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config)

    def log(self, record: dict, step: int) -> None:
        self.run.log(numbers(record), step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the run's own file store (MLflow 3 asks for this opt-in to keep using one)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.client, self.Metric = MlflowClient(uri), Metric
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "m3i")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        id_file = run_dir / "mlruns" / "run_id"
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

    def log(self, record: dict, step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(k, v, now, step) for k, v in numbers(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_trackers(report_to: list[str], run_dir: Path, config: dict, resume_step: int) -> list:
    check_installed(report_to)
    return [TRACKERS[name](run_dir, config, resume_step) for name in dict.fromkeys(report_to)]
