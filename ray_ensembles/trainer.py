"""Trainer: trains an ensemble in place, in this process or on Ray workers."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from . import storage
from .data import TensorDataset
from .ensemble import _Ensemble
from .metrics import ensemble_validation_metrics
from .progress import EnsembleProgress, Every
from .training import EnsembleFit, TrainSettings, attach_validation, make_accelerator
from .validation import check_choice, check_float, check_int


class Trainer:
    """Train every member of `ensemble` on all of `dataset`.

    Length: `train_num_steps` or `train_num_epochs` (one epoch = ceil(N / batch) steps of every
    member). `ema_decay=0` turns EMA off (the paper uses none); with EMA, predictions after
    training use the EMA weights. `amp` means bfloat16 autocast. On a GPU, `cuda_graphs` replays
    each step's forward and backward pass from a CUDA graph (same results; set it False to launch
    every kernel eagerly, for example to profile). Checkpoints are ensemble
    directories `results_folder/checkpoint-<milestone>` written every `save_every` steps and at
    the end; `load(milestone)` resumes from one exactly.

    With a Ray `scaling_config`, members train on Ray Train workers instead (see `distributed`).

    `progress` shows one bar for the whole ensemble (member-steps over all members and workers,
    rate, ETA, training loss, validation NLL). Every entry of `history` goes, in the driver
    process and in order, to `metrics_callback(entry)` and to each of `loggers` (`tracking`).
    """

    def __init__(self, ensemble: _Ensemble, dataset: TensorDataset, *, train_batch_size: int = 100,
                 train_lr: float = 1e-3, train_num_steps: int | None = None,
                 train_num_epochs: int | None = None, weight_decay: float = 0.0,
                 max_grad_norm: float | None = None, ema_decay: float = 0.0,
                 ema_update_every: int = 10, amp: bool = False, results_folder="./results",
                 save_every: int = 1000, cpu: bool = False, cuda_graphs: bool = True, progress: bool = False,
                 on_divergence: str = "raise", max_restarts: int = 3,
                 scaling_config=None, run_config=None, validation_dataset: TensorDataset | None = None,
                 metrics_callback=None, loggers=()):
        owner = "Trainer"
        if not isinstance(ensemble, _Ensemble):
            raise TypeError(f"The 'ensemble' parameter of Trainer must be a DeepEnsemble or "
                            f"DeepEnsembleClassifier. Got {type(ensemble).__name__} instead.")
        if not isinstance(dataset, TensorDataset):
            raise TypeError(f"The 'dataset' parameter of Trainer must be a TensorDataset. "
                            f"Got {type(dataset).__name__} instead.")
        if dataset.X.shape[1] != ensemble.dim_in:
            raise ValueError(f"The 'dataset' parameter of Trainer must have dim_in={ensemble.dim_in} "
                             f"input columns. Got {dataset.X.shape[1]} instead.")
        ensemble._check_y(dataset.y, len(dataset))  # wrong target shape or labels: fail now
        batch_size = check_int(owner, "train_batch_size", train_batch_size, minimum=1)
        check_float(owner, "train_lr", train_lr, strict_minimum=0.0)
        if (train_num_steps is None) == (train_num_epochs is None):
            if train_num_steps is not None:
                raise ValueError("Trainer takes one of 'train_num_steps' and 'train_num_epochs'. "
                                 f"Got both ({train_num_steps}, {train_num_epochs}) instead.")
            train_num_steps = 10_000
        if train_num_epochs is not None:
            check_int(owner, "train_num_epochs", train_num_epochs, minimum=1)
            train_num_steps = train_num_epochs * math.ceil(len(dataset) / batch_size)
        check_int(owner, "train_num_steps", train_num_steps, minimum=1)
        check_float(owner, "weight_decay", weight_decay, minimum=0.0)
        if max_grad_norm is not None:
            check_float(owner, "max_grad_norm", max_grad_norm, strict_minimum=0.0)
        check_float(owner, "ema_decay", ema_decay, minimum=0.0, below=1.0)
        check_int(owner, "ema_update_every", ema_update_every, minimum=1)
        check_int(owner, "save_every", save_every, minimum=1)
        check_choice(owner, "on_divergence", on_divergence, {"raise", "restart"})
        check_int(owner, "max_restarts", max_restarts, minimum=0)
        for name, value in [("amp", amp), ("cpu", cpu), ("cuda_graphs", cuda_graphs), ("progress", progress)]:
            if not isinstance(value, bool):
                raise TypeError(f"The '{name}' parameter of Trainer must be a bool. Got {value!r} instead.")
        if validation_dataset is not None:
            if not isinstance(validation_dataset, TensorDataset):
                raise TypeError("The 'validation_dataset' parameter of Trainer must be a TensorDataset. "
                                f"Got {type(validation_dataset).__name__} instead.")
            ensemble._check_x(validation_dataset.X, allow_members=False, move=False)
            ensemble._check_y(validation_dataset.y, len(validation_dataset))

        self.ensemble = ensemble
        self.dataset = dataset
        self.validation_dataset = validation_dataset
        self.settings = TrainSettings(
            batch_size=batch_size, lr=float(train_lr), num_steps=train_num_steps,
            weight_decay=float(weight_decay),
            max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
            ema_decay=float(ema_decay), ema_update_every=ema_update_every, amp=amp, cuda_graphs=cuda_graphs,
            save_every=save_every, on_divergence=on_divergence, max_restarts=max_restarts)
        self.results_folder = Path(results_folder)
        self.cpu = cpu
        self.progress = progress
        self.scaling_config = scaling_config
        self.run_config = run_config
        self.metrics_callback = metrics_callback
        self.loggers = list(loggers)
        for logger in self.loggers:
            if not all(callable(getattr(logger, name, None)) for name in ("start", "log_epoch", "finish")):
                raise TypeError("The 'loggers' parameter of Trainer must hold objects with start, log_epoch "
                                f"and finish methods (see ray_ensembles.tracking). Got {logger!r} instead.")
        self.checkpoint_path: Path | str | None = None
        self.run_name: str | None = None
        self.history: list[dict] = []  # per-epoch metrics of the last train()
        self.timings: dict = {}  # on Ray: worker start, training, checkpoint and assembly seconds
        self.placement: dict = {}  # on Ray: member id -> the worker rank, device and GPU ids that trained it
        self.metrics: dict = {}
        self._fit: EnsembleFit | None = None
        if scaling_config is not None:
            from .distributed import check_distributed_request
            check_distributed_request(self)

    # in-process ---------------------------------------------------------------------------------

    def _new_fit(self) -> EnsembleFit:
        accelerator = make_accelerator(cpu=self.cpu)
        return EnsembleFit(self.ensemble, self.dataset.X, self.dataset.y, self.settings, accelerator)

    def milestone_path(self, milestone: int) -> Path:
        return self.results_folder / f"checkpoint-{milestone}"

    def _save_milestone(self, fit: EnsembleFit):
        milestone = math.ceil(fit.step / self.settings.save_every)
        self.checkpoint_path = fit.save_checkpoint(self.milestone_path(milestone))
        entries, self._pending_epochs = self._pending_epochs, []
        self.emit(attach_validation(entries, fit.step, self._validation_metrics(fit.evaluate)))

    def emit(self, entries: list[dict]):
        """History entries to `history`, the callback and the loggers: the same entries, at the
        same points, in-process and on Ray. Entries replayed after a Ray worker's restart (steps
        already emitted) are skipped: the run is deterministic, so they are the same again."""
        for entry in entries:
            if self.history and entry["step"] <= self.history[-1]["step"]:
                continue
            self.history.append(entry)
            if self.metrics_callback is not None:
                self.metrics_callback(entry)
            for logger in self.loggers:
                logger.log_epoch(entry)

    def tracked_params(self) -> dict:
        """What the loggers record as the run's configuration."""
        workers = self.scaling_config.num_workers if self.scaling_config is not None else 0
        return {"task": self.ensemble.task, "num_members": self.ensemble.num_members,
                "ensemble": self.ensemble.config, "train": dataclasses.asdict(self.settings),
                "num_rows": len(self.dataset), "num_workers": workers}

    def load(self, milestone: int):
        """Resume from `results_folder/checkpoint-<milestone>`: the next `train()` continues it."""
        path = self.milestone_path(check_int("Trainer.load", "milestone", milestone, minimum=0))
        manifest = storage.read_manifest(path)
        if manifest["config"] != self.ensemble.config:
            raise ValueError(f"Checkpoint {path} was saved by an ensemble with config "
                             f"{manifest['config']}, not this one's {self.ensemble.config}.")
        self.ensemble.load_normalization_state(manifest["normalization"])
        self._fit = self._new_fit()
        self._fit.restore(path)

    def train(self):
        """Train every member; afterwards `self.ensemble` holds the trained members and
        `self.metrics` per-member and (with validation data) ensemble metrics."""
        self.history, self._pending_epochs = [], []
        for logger in self.loggers:
            logger.start(self.tracked_params())
        if self.scaling_config is not None:
            from .distributed import fit_on_ray
            member_metadata = fit_on_ray(self)
            self.metrics = self._final_metrics({m: meta["train_loss"] for m, meta in member_metadata.items()})
        else:
            self._train_here()
        for logger in self.loggers:
            logger.finish(self.metrics, self.checkpoint_path)
        return self.ensemble

    def _train_here(self):
        if self._fit is None:
            self.ensemble.fit_normalization(self.dataset.X, self.dataset.y)
            self.ensemble.feature_names = self.dataset.feature_names
            self._fit = self._new_fit()
        fit, self._fit = self._fit, None
        members, steps = self.ensemble.num_members, self.settings.num_steps
        bar = EnsembleProgress(members * steps, enabled=self.progress)
        tick = Every(0.5)

        def on_step(fit):
            if tick() or fit.step == steps:
                bar.update(members * fit.step, fit.running_loss().mean().item(), self.latest("val_nll"))

        try:
            fit.run(on_checkpoint=self._save_milestone, on_step=on_step if self.progress else None,
                    on_epoch_end=lambda epoch, losses: self._report_epoch(fit, epoch, losses))
        finally:
            bar.close()
        self.metrics = self._final_metrics(dict(zip(self.ensemble.member_ids, fit.last_finite_loss.tolist())))

    def latest(self, key: str):
        """The latest value of `key` in the history (e.g. "val_nll"), or None."""
        return next((entry[key] for entry in reversed(self.history) if key in entry), None)

    def _validation_metrics(self, evaluate) -> dict:
        if self.validation_dataset is None:
            return {}
        log_lik, points = evaluate(self.validation_dataset.X, self.validation_dataset.y)
        return ensemble_validation_metrics(self.ensemble.task, self.ensemble.member_ids, log_lik,
                                           points, self.validation_dataset.y)

    def _report_epoch(self, fit, epoch, member_losses):
        self._pending_epochs.append({"epoch": epoch, "step": fit.step, "member_train_loss": dict(
            zip(self.ensemble.member_ids, member_losses.tolist()))})

    def _final_metrics(self, train_losses: dict[int, float]) -> dict:
        """{"members": {id: {"train_loss", "val_nll"}}, and ensemble "val_nll", "val_rmse"/"val_accuracy"}."""
        members = {m: {"train_loss": loss} for m, loss in train_losses.items()}
        validation = self._validation_metrics(self.ensemble.evaluate_members)
        for m, nll in validation.pop("member_val_nll", {}).items():
            members[m]["val_nll"] = nll
        return {"members": members, **validation}
