"""Experiment tracking: per-epoch member and ensemble metrics, the configuration and the final
ensemble's location, to MLflow and to TensorBoard event files.

A logger is given to `Trainer(..., loggers=[...])` and called in the driver process, in order:
`start(params)` before training, `log_epoch(entry)` for every entry of `trainer.history` as it
arrives (on Ray, in batches as the workers checkpoint), `finish(metrics, ensemble_path)` after;
a logger's `check()`, if it has one, runs at `Trainer(...)`, so one that cannot record fails
before anything trains.
Both need only their own package: `mlflow` (or `mlflow-skinny`) and `tensorboardX` (which Ray
Tune installs).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def epoch_scalars(entry: dict) -> dict[str, float]:
    """A history entry as flat scalars: `train_loss` (mean over members), `val_nll`, `val_rmse`
    or `val_accuracy`, and per member `member_<m>/train_loss`, `member_<m>/val_nll`."""
    scalars = {}
    losses = entry.get("member_train_loss")
    if losses:
        scalars["train_loss"] = statistics.fmean(losses.values())
        scalars.update({f"member_{m}/train_loss": v for m, v in losses.items()})
    for key, value in entry.items():
        if key.startswith("val_"):
            scalars[key] = value
    scalars.update({f"member_{m}/val_nll": v for m, v in entry.get("member_val_nll", {}).items()})
    return {k: float(v) for k, v in scalars.items()}


class MLflowLogger:
    """One MLflow run per training: parameters, per-epoch metrics at their step, final metrics,
    and the saved ensemble's location as the tag `ensemble_path`.

    `tracking_uri`: a server (`http://host:5000`), a database (`sqlite:///mlflow.db`) or a local
    folder (MLflow's file store, which MLflow 3 serves only when MLFLOW_ALLOW_FILE_STORE is true:
    naming a folder here opts in). None uses MLflow's own default (MLFLOW_TRACKING_URI).
    """

    def __init__(self, tracking_uri: str | None = None, *, experiment_name: str = "ray_ensembles",
                 run_name: str | None = None, tags: dict | None = None):
        self.tracking_uri = None if tracking_uri is None else file_store_uri(tracking_uri)
        self.experiment_name, self.run_name, self.tags = experiment_name, run_name, dict(tags or {})
        self.client, self.run_id = None, None

    def check(self):
        """Refuse a tracking URI that MLflow has no store for, before any training."""
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(self.tracking_uri)
        except Exception as err:  # MLflow raises its own exception types for an unknown scheme
            raise ValueError("The 'tracking_uri' parameter of MLflowLogger must be a URI MLflow can store runs at (http(s)://, sqlite:///, a "
                             f"folder, databricks). Got {self.tracking_uri!r} instead "
                             f"({str(err).strip().splitlines()[0].strip()}).") from None

    def start(self, params: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.tracking_uri)
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.experiment_name)
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in flat_params(params).items()])

    def log_epoch(self, entry: dict):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, entry["step"])
                                                    for k, v in epoch_scalars(entry).items()])

    def finish(self, metrics: dict, ensemble_path):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        final = [Metric(f"final/{k}", float(v), now, 0) for k, v in metrics.items() if k.startswith("val_")]
        final += [Metric(f"final/member_{m}/train_loss", float(row["train_loss"]), now, 0)
                  for m, row in metrics.get("members", {}).items()]
        self.client.log_batch(self.run_id, metrics=final)
        self.client.set_tag(self.run_id, "ensemble_path", str(ensemble_path))
        self.client.set_terminated(self.run_id)


class TensorBoardLogger:
    """TensorBoard event files in `log_dir`: every scalar of `epoch_scalars` at its step, the
    configuration as text, and the ensemble's location."""

    def __init__(self, log_dir):
        self.log_dir, self.writer = str(log_dir), None

    def check(self):
        """Refuse a `log_dir` that cannot be a folder, before any training."""
        path = Path(self.log_dir)
        if "://" in self.log_dir:
            return  # a store that tensorboardX writes to: it answers when the run starts
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ValueError(f"The 'log_dir' parameter of TensorBoardLogger must be a folder that can be written or made. Got {self.log_dir!r} instead "
                             f"({existing} is {'not writable' if existing.is_dir() else 'a file'}).")

    def start(self, params: dict):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(self.log_dir)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat_params(params).items()))

    def log_epoch(self, entry: dict):
        for key, value in epoch_scalars(entry).items():
            self.writer.add_scalar(key, value, entry["step"])

    def finish(self, metrics: dict, ensemble_path):
        self.writer.add_text("ensemble_path", str(ensemble_path))
        self.writer.close()


def flat_params(params: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts as dotted keys: {"settings": {"lr": 0.1}} -> {"settings.lr": 0.1}."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def file_store_uri(tracking_uri: str) -> str:
    """A local folder as MLflow's file-store URI (opting in to that store); anything else as is."""
    tracking_uri = str(tracking_uri)
    folder = "://" not in tracking_uri and not tracking_uri.startswith(("sqlite:", "databricks"))
    if folder or tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path(tracking_uri).resolve().as_uri() if folder else tracking_uri
