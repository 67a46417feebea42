"""Trainer: trains an ensemble in place, in this process or on Ray workers."""

from __future__ import annotations

import copy
from pathlib import Path

from .io.locations import is_uri
from .loop import checkpoint
from .loop.augmentation import check_transform
from .loop.data import TensorDataset
from .loop.history import History, RunResult
from .loop.in_process import fit_here, milestone_path
from .loop.launched import fit_launched
from .loop.placement import launched_rank, local_device
from .loop.training import EnsembleFit, TrainSettings, num_steps
from .model.ensemble import Ensemble
from .model.metrics import check_predictions, run_metrics
from .model.validation import check_bool, check_int
from .training_data import check_datasets


class Trainer:
    """Train every member of `ensemble` on all of `dataset`: in this process, on Ray Train workers
    with a `scaling_config` (`distributed`), or under torchrun, each rank its share (`launched`).

    Length: `train_num_steps` or `train_num_epochs` (one epoch = ceil(N / batch) steps of every
    member). Checkpoints are ensemble directories `results_folder/checkpoint-<milestone>`, every
    `save_every` steps and at the end; `load(milestone)` resumes one exactly, and an interrupted
    `train()` continues from its last one at the next `train()`. `dataset` may be a Ray Dataset
    with its `target` column and `features`, streamed in windows of `shuffle_buffer_rows` rows
    (`streaming`). A fitted ensemble keeps its standardisation unless `refit_normalization`.
    `ema_decay=0` turns EMA off; `amp` is bfloat16 autocast; `cuda_graphs` replays each GPU step
    from a CUDA graph; `lr_scheduler` anneals the rate to 0 (cosine), after `warmup_steps` of
    linear warm-up. `optimizer`: "adam" (the default), "adamw" (decoupled `weight_decay`) or "sgd"
    (with `momentum`, and `nesterov`), each member with its own state. `augment(x, generator)`
    transforms each member's training batches, its randomness from (seed, member, step)
    (`augmentation`: RandomCrop, RandomHorizontalFlip, Compose). `progress` shows one bar
    for the whole ensemble; each entry of `history` goes, in order, to `metrics_callback(entry)`
    and to each of `loggers` (`tracking`). Every option: docs/usage.md.
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
                 lr_scheduler: bool = TrainSettings.lr_scheduler, warmup_steps: int = TrainSettings.warmup_steps,
                 optimizer: str = TrainSettings.optimizer, momentum: float = TrainSettings.momentum,
                 nesterov: bool = TrainSettings.nesterov, refit_normalization: bool = False,
                 scaling_config=None, run_config=None, validation_dataset: TensorDataset | None = None,
                 metrics_callback=None, loggers=(), target: str | None = None, features=None,
                 shuffle_buffer_rows: int = TrainSettings.shuffle_buffer_rows, augment=TrainSettings.augment):
        dataset, validation_dataset = check_datasets(ensemble, dataset, validation_dataset, target, features)
        batch_size = check_int("Trainer", "train_batch_size", train_batch_size, minimum=1)  # the length needs it
        self.settings = TrainSettings(  # checks every option of the loop
            batch_size=batch_size, lr=train_lr,
            num_steps=num_steps(len(dataset), batch_size, train_num_steps, train_num_epochs),
            weight_decay=weight_decay, max_grad_norm=max_grad_norm, ema_decay=ema_decay,
            ema_update_every=ema_update_every, amp=amp, cuda_graphs=cuda_graphs, save_every=save_every,
            on_divergence=on_divergence, max_restarts=max_restarts, lr_scheduler=lr_scheduler,
            warmup_steps=warmup_steps, optimizer=optimizer, momentum=momentum, nesterov=nesterov,
            shuffle_buffer_rows=shuffle_buffer_rows, augment=augment)
        if augment is not None:
            check_transform(augment, ensemble.input_shape)
        for name, value in [("cpu", cpu), ("progress", progress), ("refit_normalization", refit_normalization)]:
            check_bool("Trainer", name, value)
        if Path(results_folder).exists() and not Path(results_folder).is_dir():
            raise ValueError(f"The 'results_folder' parameter of Trainer must be a folder (it holds "
                             f"the checkpoints). Got {str(results_folder)!r}, a file, instead.")

        self.ensemble, self.dataset, self.validation_dataset = ensemble, dataset, validation_dataset
        self.refit_normalization, self.cpu, self.progress = refit_normalization, cpu, progress
        self.results_folder = Path(results_folder)
        self.scaling_config, self.run_config = scaling_config, run_config
        self.recorder = History(metrics_callback, loggers)  # checks them
        if scaling_config is not None:
            from .on_ray.distributed import check_distributed_request
            check_distributed_request(ensemble, scaling_config, run_config)
        self.checkpoint_path: Path | str | None = None
        self.run_name: str | None = None
        self.timings: dict = {}  # on Ray: worker start, training, checkpoint and assembly seconds
        self.placement: dict = {}  # on Ray or torchrun: member id -> the rank (and device) that trained it
        self.metrics: dict = {}
        self._fit: EnsembleFit | None = None  # a run held between load() or an interrupt and train()
        self.resume_path: Path | None = None  # the checkpoint the next train() continues (load, interrupt)
        self._initial_members = None  # the weights an interrupted run restarts from, before its first checkpoint

    @classmethod
    def check(cls, ensemble, dataset, **options) -> TrainSettings:
        """Check `Trainer(ensemble, dataset, **options)` as the constructor does, creating nothing
        (no folder, no Ray), and return the loop's settings: for callers that only validate."""
        return cls(ensemble, dataset, **options).settings

    @property
    def history(self) -> list[dict]:
        """Per-epoch metrics of the last train()."""
        return self.recorder.entries

    def train(self):
        """Train every member; afterwards `self.ensemble` holds the trained members and
        `self.metrics` per-member and (with validation data) ensemble metrics."""
        self.checkpoint_path = None
        self.ensemble.calibration = None  # fitted to the members as they were
        self._restore_interrupted_run()
        self.recorder.start(self.tracked_params())
        try:
            if self._fit is None:
                self.prepare_normalization()
            if self.scaling_config is not None:
                result = self._fit_on_ray()
            elif launched_rank()[1] > 1:
                result = self._fit_launched()
            else:
                fit = fit_here(self._fit or self._new_fit(), folder=self.results_folder, history=self.recorder,
                               validation=self.validation_dataset, progress=self.progress, on_save=self._saved)
                result = RunResult(self.checkpoint_path, dict(zip(fit.ensemble.member_ids, fit.last_finite_loss.tolist())), {})
        except BaseException:
            self._fit, self.resume_path = None, self._this_runs_checkpoint()
            raise
        self._fit = self.resume_path = self._initial_members = None
        self.checkpoint_path, self.run_name = result.checkpoint_path, result.run_name
        self.placement, self.timings = result.placement, result.timings
        self.metrics = run_metrics(self.ensemble, self.validation_dataset, result.train_losses)
        check_predictions(self.ensemble, self.validation_dataset or self.dataset.evaluation_rows(), self.checkpoint_path)
        self.recorder.finish(self.metrics, self.checkpoint_path)
        return self.ensemble

    def _fit_on_ray(self) -> RunResult:
        from .on_ray.distributed import fit_on_ray

        return fit_on_ray(self.ensemble, self.dataset, self.settings, scaling_config=self.scaling_config,
                          run_config=self.run_config, results_folder=self.results_folder,
                          validation_dataset=self.validation_dataset, resume_from=self.resume_path,
                          history=self.recorder, progress=self.progress)

    def _fit_launched(self) -> RunResult:
        if self.resume_path is not None:
            raise ValueError("Resuming a checkpoint is not supported under torchrun or accelerate "
                             "launch; resume it in one process or on Ray.")
        return fit_launched(self.ensemble, self._new_fit, results_folder=self.results_folder, history=self.recorder,
                            validation=self.validation_dataset, progress=self.progress)

    def prepare_normalization(self):
        """Fit the standardisation to this data unless the ensemble's is fitted already (a
        trained or loaded ensemble keeps its own, unless `refit_normalization`)."""
        if self.refit_normalization or not self.ensemble.normalization_fitted:
            self.dataset.fit_standardization(self.ensemble)

    def tracked_params(self) -> dict:
        """What the loggers record as the run's configuration."""
        workers = self.scaling_config.num_workers if self.scaling_config is not None else 0
        return {"task": self.ensemble.task, "num_members": self.ensemble.num_members,
                "ensemble": self.ensemble.config, "train": self.settings.record(),
                "num_rows": len(self.dataset), "num_workers": workers}

    def latest(self, key: str):
        """The latest value of `key` in the history (e.g. "val_nll"), or None."""
        return self.recorder.latest(key)

    # checkpoints and resuming ----------------------------------------------------------------------

    def milestone_path(self, milestone: int) -> Path:
        return milestone_path(self.results_folder, milestone)

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

    def _new_fit(self, ensemble=None) -> EnsembleFit:
        return EnsembleFit(ensemble or self.ensemble, self.dataset, self.settings, local_device(self.cpu))

    def _saved(self, path):
        self.checkpoint_path = path

    def _restore_interrupted_run(self):
        """After an interrupted train(): its last checkpoint, or before it had one, the members'
        initial weights; before a first run, keep those weights for such a restart."""
        if self._fit is None and self.resume_path is not None:
            self._load_checkpoint(self.resume_path)
        elif self._fit is None and self._initial_members is not None:
            self.ensemble.members.load_state_dict(self._initial_members[0])
            self.ensemble.member_seeds = list(self._initial_members[1])
        elif self._fit is None:
            self._initial_members = (copy.deepcopy(self.ensemble.members.state_dict()), list(self.ensemble.member_seeds))

    def _this_runs_checkpoint(self) -> Path | None:
        """The latest checkpoint the interrupted run wrote, if it wrote one (local ones only)."""
        path = self.checkpoint_path
        return Path(path) if path is not None and not is_uri(path) and Path(path).exists() else self.resume_path
