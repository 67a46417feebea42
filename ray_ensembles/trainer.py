"""Trainer: trains an ensemble in place, in this process or on Ray workers."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

from . import checkpoint, storage
from .data import TensorDataset
from .ensemble import Ensemble
from .metrics import ensemble_validation_metrics
from .locations import is_uri
from .placement import assign_members, launched_rank, local_device, process_group
from .progress import EnsembleProgress, Every
from .training import EnsembleFit, TrainSettings, attach_validation
from .training_data import check_datasets
from .validation import check_bool, check_callable, check_int


def num_steps(num_rows: int, batch_size: int, steps: int | None, epochs: int | None) -> int:
    """The length of a run: `steps`, or `epochs` of ceil(num_rows / batch_size) steps, or 10,000
    steps (TrainSettings' default, deep-ensembles-pytorch's) when neither is given."""
    if steps is not None and epochs is not None:
        raise ValueError("Trainer takes one of 'train_num_steps' and 'train_num_epochs'. "
                         f"Got both ({steps}, {epochs}) instead.")
    if epochs is not None:
        return check_int("Trainer", "train_num_epochs", epochs, minimum=1) * math.ceil(num_rows / batch_size)
    return check_int("Trainer", "train_num_steps", TrainSettings.num_steps if steps is None else steps, minimum=1)


class Trainer:
    """Train every member of `ensemble` on all of `dataset`.

    Length: `train_num_steps` or `train_num_epochs` (one epoch = ceil(N / batch) steps of every
    member). `ema_decay=0` turns EMA off (the paper uses none); with EMA, predictions after
    training use the EMA weights. `amp` means bfloat16 autocast. On a GPU, `cuda_graphs` replays
    each step's forward and backward pass from a CUDA graph (same results; set it False to launch
    every kernel eagerly, for example to profile). Checkpoints are ensemble
    directories `results_folder/checkpoint-<milestone>` written every `save_every` steps and at
    the end; `load(milestone)` resumes from one exactly.

    `dataset` may be a Ray Dataset larger than memory, with its `target` column and `features`
    (default: every other numeric column): every process then streams all of it, every epoch,
    its members drawing their rows from windows of `shuffle_buffer_rows` rows (`streaming`),
    after one pass that fits the standardisation and checks every value.

    With a Ray `scaling_config`, members train on Ray Train workers instead (see `distributed`).
    Started by torchrun or `accelerate launch`, each process trains its round-robin share of the
    members (nothing is averaged), writes its own member files, and rank 0 assembles the ensemble
    into `results_folder/checkpoint-<milestone>`; every process ends holding all of it.

    An ensemble whose normalisation is fitted (a trained or loaded one) keeps its statistics when
    trained on further: `refit_normalization=True` fits them to this data again. A `train()`
    that was interrupted continues from its last checkpoint at the next `train()` (or starts
    again from the same initial weights, before the first checkpoint). `lr_scheduler` anneals
    the learning rate to 0 over the run (cosine, as deep-ensembles-pytorch does; the paper keeps
    it constant, which leaves each member's last weights as far from their optimum as one step
    moves them: docs/benchmarks.md, "Learning rate").

    `progress` shows one bar for the whole ensemble (member-steps over all members and workers,
    rate, ETA, training loss, validation NLL). Every entry of `history` goes, in the driver
    process and in order, to `metrics_callback(entry)` and to each of `loggers` (`tracking`).
    """

    # the loop's options default to TrainSettings' own, written there once
    def __init__(self, ensemble: Ensemble, dataset: TensorDataset, *,
                 train_batch_size: int = TrainSettings.batch_size, train_lr: float = TrainSettings.lr,
                 train_num_steps: int | None = None, train_num_epochs: int | None = None,
                 weight_decay: float = TrainSettings.weight_decay,
                 max_grad_norm: float | None = TrainSettings.max_grad_norm,
                 ema_decay: float = TrainSettings.ema_decay, ema_update_every: int = TrainSettings.ema_update_every,
                 amp: bool = TrainSettings.amp, results_folder="./results",
                 save_every: int = TrainSettings.save_every, cpu: bool = False,
                 cuda_graphs: bool = TrainSettings.cuda_graphs, progress: bool = False,
                 on_divergence: str = TrainSettings.on_divergence, max_restarts: int = TrainSettings.max_restarts,
                 lr_scheduler: bool = TrainSettings.lr_scheduler, refit_normalization: bool = False,
                 scaling_config=None, run_config=None, validation_dataset: TensorDataset | None = None,
                 metrics_callback=None, loggers=(), target: str | None = None, features=None,
                 shuffle_buffer_rows: int = TrainSettings.shuffle_buffer_rows):
        dataset, validation_dataset = check_datasets(ensemble, dataset, validation_dataset, target, features)
        batch_size = check_int("Trainer", "train_batch_size", train_batch_size, minimum=1)  # the length needs it
        self.settings = TrainSettings(  # checks every option of the loop
            batch_size=batch_size, lr=train_lr,
            num_steps=num_steps(len(dataset), batch_size, train_num_steps, train_num_epochs),
            weight_decay=weight_decay, max_grad_norm=max_grad_norm, ema_decay=ema_decay,
            ema_update_every=ema_update_every, amp=amp, cuda_graphs=cuda_graphs, save_every=save_every,
            on_divergence=on_divergence, max_restarts=max_restarts, lr_scheduler=lr_scheduler,
            shuffle_buffer_rows=shuffle_buffer_rows)
        for name, value in [("cpu", cpu), ("progress", progress), ("refit_normalization", refit_normalization)]:
            check_bool("Trainer", name, value)
        if Path(results_folder).exists() and not Path(results_folder).is_dir():
            raise ValueError(f"The 'results_folder' parameter of Trainer must be a folder (it holds "
                             f"the checkpoints). Got {str(results_folder)!r}, a file, instead.")
        check_callable("Trainer", "metrics_callback", metrics_callback, "callable (it gets each history entry)")

        self.ensemble = ensemble
        self.dataset = dataset
        self.validation_dataset = validation_dataset
        self.refit_normalization = refit_normalization
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
            if callable(getattr(logger, "check", None)):
                logger.check()  # a tracker that cannot record fails here, not after training
        self.checkpoint_path: Path | str | None = None
        self.run_name: str | None = None
        self.history: list[dict] = []  # per-epoch metrics of the last train()
        self.timings: dict = {}  # on Ray: worker start, training, checkpoint and assembly seconds
        self.placement: dict = {}  # on Ray or torchrun: member id -> the rank (and device) that trained it
        self.metrics: dict = {}
        self._fit: EnsembleFit | None = None
        self.resume_path: Path | None = None  # the checkpoint the next train() continues (load, interrupt)
        self._initial_members = None  # the weights an interrupted run restarts from, before its first checkpoint
        if scaling_config is not None:
            from .distributed import check_distributed_request
            check_distributed_request(ensemble, scaling_config, run_config)

    # in-process ---------------------------------------------------------------------------------

    def _new_fit(self, ensemble=None) -> EnsembleFit:
        return EnsembleFit(ensemble or self.ensemble, self.dataset, self.settings, local_device(self.cpu))

    def milestone_path(self, milestone: int) -> Path:
        return self.results_folder / f"checkpoint-{milestone}"

    def _save_milestone(self, fit: EnsembleFit):
        milestone = math.ceil(fit.step / self.settings.save_every)
        self.checkpoint_path = checkpoint.save(fit, self._checkpoint_folder() / f"checkpoint-{milestone}")
        entries, self._pending_epochs = self._pending_epochs, []
        self.emit(attach_validation(entries, fit.step, self._validation_metrics(fit.evaluate, fit.ensemble.member_ids)))

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

    def save(self, milestone: int) -> Path:
        """Write `results_folder/checkpoint-<milestone>`: the training state when a run is held
        (after `load` or an interrupt) so that `load(milestone)` resumes it, else the ensemble."""
        path = self.milestone_path(check_int("Trainer.save", "milestone", milestone, minimum=0))
        return checkpoint.save(self._fit, path) if self._fit is not None else self.ensemble.save(path)

    def load(self, milestone: int):
        """Resume from `results_folder/checkpoint-<milestone>`: the next `train()` continues it,
        in this process or on Ray. Refuses a checkpoint of another ensemble or other data; warns
        when the training settings differ from the saved ones (they apply from here on)."""
        self._load_checkpoint(self.milestone_path(check_int("Trainer.load", "milestone", milestone, minimum=0)))

    def _load_checkpoint(self, path: Path):
        checkpoint.check_resumable(path, self.ensemble, self.settings)  # takes its normalisation
        fit = self._new_fit()
        checkpoint.restore(fit, path)  # refuses other data
        self._fit, self.resume_path = fit, path

    def prepare_normalization(self):
        """Fit the standardisation to this data unless the ensemble's is fitted already (a
        trained or loaded ensemble keeps its own, unless `refit_normalization`)."""
        if self.refit_normalization or not self.ensemble.normalization_fitted:
            self.dataset.fit_standardization(self.ensemble)

    def train(self):
        """Train every member; afterwards `self.ensemble` holds the trained members and
        `self.metrics` per-member and (with validation data) ensemble metrics."""
        self.history, self._pending_epochs, self.checkpoint_path = [], [], None
        self.ensemble.calibration = None  # fitted to the members as they were
        if self._fit is None and self.resume_path is not None:  # interrupted: its last checkpoint
            self._load_checkpoint(self.resume_path)
        elif self._fit is None and self._initial_members is not None:  # interrupted before one
            self.ensemble.members.load_state_dict(self._initial_members[0])
            self.ensemble.member_seeds = list(self._initial_members[1])
        elif self._fit is None:
            self._initial_members = (copy.deepcopy(self.ensemble.members.state_dict()), list(self.ensemble.member_seeds))
        for logger in self.loggers:
            logger.start(self.tracked_params())
        try:
            if self._fit is None:
                self.prepare_normalization()
            if self.scaling_config is not None:
                self._train_on_ray()
            elif launched_rank()[1] > 1:
                self._train_launched()
            else:
                fit = self._train_here()
                self.metrics = self._final_metrics(dict(zip(fit.ensemble.member_ids, fit.last_finite_loss.tolist())))
        except BaseException:
            self._fit, self.resume_path = None, self._this_runs_checkpoint()
            raise
        self._fit = self.resume_path = self._initial_members = None
        self._check_predictions()
        for logger in self.loggers:
            logger.finish(self.metrics, self.checkpoint_path)
        return self.ensemble

    def _check_predictions(self):
        """An ensemble that trained but cannot predict finite values in the target's units (a
        target of extreme scale) fails here, where the run is still at hand, not at its first use."""
        rows = self.validation_dataset or self.dataset.evaluation_rows()
        if rows is None:
            return
        try:
            self.ensemble.predict(rows.X[:256]).variance  # the mixture's sum can overflow alone
        except FloatingPointError as err:
            raise FloatingPointError(f"The ensemble trained, but cannot predict: {err} Its members are "
                                     f"saved at {self.checkpoint_path}.") from None

    def _train_on_ray(self):
        from .distributed import fit_on_ray

        result = fit_on_ray(self.ensemble, self.dataset, self.settings, scaling_config=self.scaling_config,
                            run_config=self.run_config, results_folder=self.results_folder,
                            validation_dataset=self.validation_dataset, resume_from=self.resume_path,
                            emit=self.emit, progress=self.progress)
        self.checkpoint_path, self.run_name = result.checkpoint_path, result.run_name
        self.placement, self.timings = result.placement, result.timings
        self.metrics = self._final_metrics(result.train_losses)

    def _this_runs_checkpoint(self) -> Path | None:
        """The latest checkpoint the interrupted run wrote, if it wrote one (local ones only)."""
        path = self.checkpoint_path
        return Path(path) if path is not None and not is_uri(path) and Path(path).exists() else self.resume_path

    def _checkpoint_folder(self) -> Path:
        """Where this process writes its checkpoints: the results folder, or under torchrun a
        folder per rank, since each rank writes only its own members."""
        rank, world = launched_rank()
        return self.results_folder / f"rank-{rank}" if world > 1 and self.scaling_config is None else self.results_folder

    def _train_here(self, ensemble=None) -> EnsembleFit:
        if self._fit is None:
            self._fit = self._new_fit(ensemble)
        fit = self._fit
        members, steps = fit.ensemble.num_members, self.settings.num_steps
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
        return fit

    def _train_launched(self):
        """Under torchrun or accelerate launch: this rank trains its members in this process, and
        rank 0 assembles every rank's last checkpoint into the ensemble's, which all ranks load."""
        if self.resume_path is not None:
            raise ValueError("Resuming a checkpoint is not supported under torchrun or accelerate "
                             "launch; resume it in one process or on Ray.")
        rank, world = launched_rank()
        shares = assign_members(self.ensemble.member_ids, world)
        with process_group() as dist:
            fit = self._train_here(self.ensemble.subset(shares[rank]))
            path = self.milestone_path(math.ceil(fit.step / self.settings.save_every))
            dist.barrier()  # every rank's last checkpoint is written
            if rank == 0:
                files = {}
                for r, ids in enumerate(shares):
                    folder = self.results_folder / f"rank-{r}" / path.name
                    files.update(zip(ids, storage.read_members(folder, self.ensemble.subset(ids))))
                storage.write_ensemble(path, self.ensemble, files, training=checkpoint.training_state(fit))
            dist.barrier()  # the ensemble is written
        metadata = storage.load_members(path, self.ensemble)
        self.ensemble.eval()
        self.checkpoint_path = path
        self.placement = {m: {"rank": r} for r, ids in enumerate(shares) for m in ids}
        self.metrics = self._final_metrics({m: meta["train_loss"] for m, meta in metadata.items()})

    def latest(self, key: str):
        """The latest value of `key` in the history (e.g. "val_nll"), or None."""
        return next((entry[key] for entry in reversed(self.history) if key in entry), None)

    def _validation_metrics(self, evaluate, member_ids: list[int]) -> dict:
        """Validation metrics of the members `evaluate` scores, which have these ids."""
        if self.validation_dataset is None:
            return {}
        log_lik, points = evaluate(self.validation_dataset.X, self.validation_dataset.y)
        return ensemble_validation_metrics(self.ensemble.task, member_ids, log_lik, points, self.validation_dataset.y)

    def _report_epoch(self, fit, epoch, member_losses):
        self._pending_epochs.append({"epoch": epoch, "step": fit.step, "member_train_loss": dict(
            zip(fit.ensemble.member_ids, member_losses.tolist()))})

    def _final_metrics(self, train_losses: dict[int, float]) -> dict:
        """{"members": {id: {"train_loss", "val_nll"}}, and ensemble "val_nll", "val_rmse"/"val_accuracy"}."""
        members = {m: {"train_loss": loss} for m, loss in train_losses.items()}
        validation = self._validation_metrics(self.ensemble.evaluate_members, self.ensemble.member_ids)
        for m, nll in validation.pop("member_val_nll", {}).items():
            members[m]["val_nll"] = nll
        return {"members": members, **validation}
