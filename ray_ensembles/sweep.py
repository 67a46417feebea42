"""Ray Tune sweeps over ensemble size, adversarial epsilon and any other option, and the M curve.

Every trial trains a whole ensemble with the Trainer and is scored by the ensemble's NLL on a
validation part carved out of the TRAINING rows. A CPU trial trains in its own Tune process
(members stacked), without Ray Train's start-up; a trial with a GPU or several workers runs
`Trainer(..., scaling_config=...)`, M members on up to M workers. Either way its members are the
same networks: they depend on (seed, member id) alone. `hyper_ensemble` (module `hyper`) builds
on it; `m_curve` (module `selection`) needs no sweep and no Ray, and is importable from here too.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray.tune import Callback

from .io.locations import is_uri, join, run_ensemble_path
from .loop.data import TensorDataset
from .model.selection import m_curve  # noqa: F401 (public here: sweeps and the M curve answer one question)
from .model.validation import check_choice, check_float, check_int, check_type, fail
from .on_ray.cluster import autoscaling, capacity

ALIASES = {"lr": "train_lr", "epochs": "train_num_epochs", "batch_size": "train_batch_size",
           "steps": "train_num_steps"}
DRIVER_CPU = 0.1  # a Ray Train trial's own function only builds and waits on its run
TRIAL_TRAINING = ("auto", "in_trial", "ray_train")
# What the sweep itself sets for every trial, from the data and its own arguments.
_SET_BY_SWEEP = {"self", "dim_in", "dim_out", "num_classes", "member_ids", "member_factory",
                 "ensemble", "dataset", "validation_dataset", "scaling_config", "run_config",
                 "results_folder", "save_every", "metrics_callback", "loggers", "progress", "cpu"}


def _options_of(function) -> set[str]:
    return set(inspect.signature(function).parameters) - _SET_BY_SWEEP


def option_names(task: str) -> tuple[set[str], set[str]]:
    """(ensemble options, Trainer options) a trial may take: the keyword parameters of the
    ensemble class and of Trainer, so a new option is sweepable without a list to update."""
    from .model.ensemble import ENSEMBLE_CLASSES
    from .trainer import Trainer

    return _options_of(ENSEMBLE_CLASSES[task].__init__), _options_of(Trainer.__init__)


def canonical_options(options: dict, task: str, where: str) -> dict:
    """`options` under their parameter names (aliases resolved); an unknown one is refused."""
    ensemble, trainer = option_names(task)
    out = {}
    for key, value in options.items():
        name = ALIASES.get(key, key)
        if name not in ensemble | trainer:
            raise ValueError(f"The '{where}' parameter of tune_ensemble has an unknown option {key!r}; "
                             f"known: {sorted(ensemble | trainer | set(ALIASES))}.")
        out[name] = value
    return out


def _python_scalar(value):
    """numpy scalars (np.int64(32)) as Python's own, so that configs serialise."""
    return value.item() if isinstance(value, np.generic) else value


@dataclass
class SweepResult:
    """`table`: one dict per trial, sorted by validation NLL (best first). `best_config`: the
    swept values of the best trial. `best_ensemble_path`: its saved ensemble."""

    table: list[dict]
    best_config: dict
    best_ensemble_path: str
    result_grid: object = None


def _values(name, spec):
    """The finite set of values a search-space entry can take, when it has one."""
    if isinstance(spec, (list, tuple)):
        return list(spec)
    if isinstance(spec, dict) and "grid_search" in spec:
        return list(spec["grid_search"])
    return list(getattr(spec, "categories", [])) or None


def normalize_param_space(param_space, task: str = "regression") -> dict:
    """Check the space and turn plain lists into grid searches; Tune's objects pass through."""
    from ray import tune

    if not isinstance(param_space, dict) or not param_space:
        fail("tune_ensemble", "param_space", "a non-empty dict of option -> values", param_space)
    space = {}
    for name, spec in canonical_options(param_space, task, "param_space").items():
        if isinstance(spec, (list, tuple)):
            spec = [_python_scalar(v) for v in spec]
        values = _values(name, spec)
        if values is not None and not values:
            raise ValueError(f"The '{name}' grid of tune_ensemble's param_space is empty. Got {spec!r} instead.")
        for v in values or []:
            if name == "num_members" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"The 'num_members' values of tune_ensemble must be ints >= 1. Got {v!r} instead.")
            if name == "adversarial_eps" and (not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"The 'adversarial_eps' values of tune_ensemble must be >= 0. Got {v!r} instead.")
        space[name] = tune.grid_search(values) if isinstance(spec, (list, tuple)) else spec
    return space


def grid_size(space) -> int:
    """How many trials Tune makes of the space: one per combination of its grids."""
    return math.prod(len(spec["grid_search"]) for spec in space.values()
                     if isinstance(spec, dict) and "grid_search" in spec)


def _largest(space, name, default):
    values = _values(name, space.get(name, [default]))
    if values is None:
        raise ValueError(f"The '{name}' entry of tune_ensemble's param_space must have a finite set "
                         f"of values (a list, grid_search or choice) to size trials.")
    return max(values)


def tune_ensemble(dataset: TensorDataset, param_space: dict, *, task: str = "regression",
                  validation_dataset: TensorDataset | None = None, validation_fraction: float = 0.2,
                  ensemble_options: dict | None = None, trainer_options: dict | None = None,
                  scheduler: str | None = None, num_reports: int = 4, num_samples: int = 1,
                  max_concurrent: int | None = None,
                  cpus_per_worker: float = 1.0, use_gpu: bool = False,
                  max_workers_per_trial: int | None = None, trial_training: str = "auto",
                  storage_path=None, name: str | None = None,
                  resume: bool = False, seed: int = 0, progress: bool = False,
                  callbacks: list | None = None) -> SweepResult:
    """One Tune trial per combination of `param_space` (lists are grids), each a distributed
    ensemble; returns the trials sorted by validation NLL and where the best ensemble is.

    The validation rows come from `validation_dataset`, or else a `validation_fraction` of the
    training rows: never test rows. Each trial reports `num_reports` times (at its checkpoints);
    `scheduler="asha"` stops poor trials early. `num_samples` repeats the grid that many times,
    drawing the space's distributions (`tune.loguniform`, ...) anew each time, from `seed`.
    `trial_training`: "in_trial" trains each trial in its own Tune process (`cpus_per_worker`
    CPUs, members stacked), "ray_train" runs a Ray Train run of up to M workers per trial (up to
    `max_workers_per_trial`), and "auto" (the default) picks in_trial unless the sweep asks for
    a GPU or `max_workers_per_trial` > 1. The table's `training` column says which. Concurrency
    is sized so that trials never wait for each other's CPUs or GPUs; `resume=True` continues
    the sweep called `name`. With `progress`, it prints the trials' placement, one line per finished trial and Tune's status
    table at most every 30 s. `callbacks` are Tune callbacks (e.g. Ray's MLflowLoggerCallback).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from .on_ray.distributed import env_default
    from .model.ensemble import ENSEMBLE_CLASSES

    owner = "tune_ensemble"
    check_choice(owner, "task", task, {"regression", "classification"})
    space = normalize_param_space(param_space, task)
    check_choice(owner, "scheduler", scheduler, {None, "asha"})
    check_int(owner, "num_reports", num_reports, minimum=1)
    check_int(owner, "num_samples", num_samples, minimum=1)
    check_float(owner, "cpus_per_worker", cpus_per_worker, strict_minimum=0.0)
    check_choice(owner, "trial_training", trial_training, set(TRIAL_TRAINING))
    if max_workers_per_trial is not None:
        check_int(owner, "max_workers_per_trial", max_workers_per_trial, minimum=1)
    if trial_training == "auto":
        trial_training = "ray_train" if use_gpu or (max_workers_per_trial or 1) > 1 else "in_trial"
    check_type(owner, "dataset", dataset, TensorDataset, "a TensorDataset")
    if validation_dataset is None:
        dataset, validation_dataset = dataset.split(validation_fraction, seed=seed)
    ensemble_options = canonical_options(dict(ensemble_options or {}), task, "ensemble_options")
    trainer_options = canonical_options(dict(trainer_options or {}), task, "trainer_options")
    if resume and not name:
        raise ValueError("The 'resume' parameter of tune_ensemble needs the 'name' of the sweep. Got no name instead.")
    name = name or f"sweep-{os.urandom(3).hex()}"
    storage = str(storage_path or "tune_results")
    if not is_uri(storage):
        storage = str(Path(storage).resolve())

    largest_m = _largest(space, "num_members", ensemble_options.get("num_members", 5))
    workers, concurrent, placement = size_trials(largest_m, trial_training, cpus_per_worker, use_gpu,
                                                 max_workers_per_trial, max_concurrent)

    cls = ENSEMBLE_CLASSES[task]
    dim_out = {"dim_out": dataset.y.shape[1] if dataset.y.ndim == 2 else 1} if task == "regression" else \
        {"num_classes": int(max(dataset.y.max(), validation_dataset.y.max())) + 1}
    base = {"cls": cls, "dim_out": dim_out, "ensemble": ensemble_options, "trainer": trainer_options,
            "num_reports": num_reports, "cpus_per_worker": cpus_per_worker, "use_gpu": use_gpu,
            "max_workers": workers, "trials_dir": join(storage, name, "trials"), "training": trial_training}
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, train=dataset, validation=validation_dataset, base=base),
        {"CPU": cpus_per_worker, "GPU": int(use_gpu)} if trial_training == "in_trial" else {"CPU": DRIVER_CPU})
    path = join(storage, name)
    console = {"callbacks": list(callbacks or [])}
    if progress:
        print(placement, flush=True)
        console.update(verbose=1, callbacks=[*console["callbacks"], TrialLines(list(space), grid_size(space) * num_samples)], progress_reporter=tune.CLIReporter(
            max_report_frequency=30, parameter_columns=list(space), metric_columns=["val_nll", "training_iteration"]))
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ValueError(f"The 'resume' parameter of tune_ensemble needs a sweep at {path}; there is none.")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        asha = ASHAScheduler(time_attr="training_iteration", max_t=num_reports, grace_period=1,
                             reduction_factor=2) if scheduler == "asha" else None
        tuner = tune.Tuner(trainable, param_space=space,
                           tune_config=tune.TuneConfig(metric="val_nll", mode="min", scheduler=asha,
                                                       num_samples=num_samples,
                                                       # the variant generator limits concurrency itself:
                                                       # given one, Tune ignores max_concurrent_trials
                                                       search_alg=BasicVariantGenerator(max_concurrent=concurrent,
                                                                                        random_state=seed)),
                           run_config=tune.RunConfig(name=name, storage_path=storage,
                                                     **{"verbose": 0, **console}))
    # Tune's CLIReporter (a status table at most every 30 s) runs only under its classic output
    with env_default("RAY_AIR_NEW_OUTPUT", "0") if progress else contextlib.nullcontext():
        grid = tuner.fit()
    table = result_table(grid, space, trial_training, base["trials_dir"])
    if not table or table[0].get("val_nll") is None:
        raise RuntimeError(f"No trial of the sweep {name} finished: {[r['error'] for r in table]}")
    best = table[0]
    return SweepResult(table, {k: best[k] for k in space}, best["ensemble_path"], grid)


def size_trials(largest_m: int, trial_training: str, cpus_per_worker: float, use_gpu: bool,
                max_workers_per_trial: int | None, max_concurrent: int | None) -> tuple[int, int, str]:
    """(workers per trial, trials at once, a line saying so) against the cluster. A Ray Train
    trial is its driver (DRIVER_CPU) plus up to M workers, capped at what the cluster holds
    beside that driver: members stack on the workers that fit. An in-trial trial is one worker's
    worth in Tune's own process. Only a trial that cannot get even one worker is refused. The
    largest trial decides how many run at once."""
    have = capacity()
    in_trial = trial_training == "in_trial"
    driver = 0.0 if in_trial else DRIVER_CPU
    workers = 1 if in_trial else min(largest_m, max_workers_per_trial or largest_m)
    if not autoscaling():
        room = math.floor((have.get("CPU", 0) - driver) / cpus_per_worker + 1e-9)
        workers = min(workers, room, *([int(have.get("GPU", 0))] if use_gpu else []))
    need = {"CPU": driver + max(workers, 1) * cpus_per_worker, "GPU": max(workers, 1) if use_gpu else 0}
    if workers < 1 and not autoscaling():
        raise ValueError(f"The largest trial of tune_ensemble needs at least {need} (M={largest_m} on 1 "
                         f"worker, {cpus_per_worker:g} CPU each{'' if in_trial else f', plus {DRIVER_CPU} CPU for the trial'}) "
                         f"but the Ray cluster has {dict((r, have.get(r, 0)) for r in need)}.")
    fits = [math.floor(have.get(r, 0) / n + 1e-9) for r, n in need.items() if n > 0]
    concurrent = max(1, min(fits)) if max_concurrent is None else \
        check_int("tune_ensemble", "max_concurrent", max_concurrent, minimum=1)
    at_once = f"{concurrent} trial{'s' * (concurrent != 1)} at a time"
    placement = (f"each trial: in its own process, {cpus_per_worker:g} CPU{' + 1 GPU' if use_gpu else ''} "
                 f"(members stacked, no Ray Train run); {at_once}" if in_trial else
                 f"each trial: up to {workers} Ray Train worker{'s' * (workers != 1)} x {cpus_per_worker:g} CPU"
                 f"{' + 1 GPU' if use_gpu else ''} (members stacked round-robin) + {DRIVER_CPU} CPU for the "
                 f"trial; {at_once}")
    return workers, concurrent, placement


def result_table(grid, space: dict, trial_training: str, trials_dir: str) -> list[dict]:
    """One row per trial of Tune's `grid`: its swept values, its last metrics, how it trained,
    its error and where its ensemble is; best validation NLL first."""
    table = []
    for result in grid:
        row = {k: result.config.get(k) for k in space}
        metrics = result.metrics or {}
        row.update({k: metrics.get(k) for k in ("val_nll", "val_rmse", "val_accuracy",
                                                "mean_member_val_nll", "training_iteration")
                    if k in metrics})
        trial_id = metrics.get("trial_id") or (result.path and Path(result.path).name)
        row.update(training=trial_training, trial_id=trial_id, error=None if result.error is None else str(result.error).splitlines()[0],
                   ensemble_path=run_ensemble_path(trials_dir, trial_id))
        table.append(row)
    table.sort(key=lambda r: (r.get("val_nll") is None, r.get("val_nll") or 0.0))
    return table


class TrialLines(Callback):
    """In the driver: one line per finished trial, with its swept values, validation NLL and time."""

    def __init__(self, keys: list[str], total: int):
        self.keys, self.total, self.finished = keys, total, 0

    def _values(self, trial) -> str:
        return " ".join(f"{k}={trial.config.get(k)}" for k in self.keys)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        result = trial.last_result or {}
        nll = result.get("val_nll")
        print(f"trial {self.finished}/{self.total} done: {self._values(trial)}  val_nll "
              f"{'n/a' if nll is None else f'{nll:.4f}'}  {result.get('time_total_s', 0):.1f} s", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished += 1
        print(f"trial {self.finished}/{self.total} FAILED: {self._values(trial)} (see {trial.path})", flush=True)


def split_options(options: dict, task: str) -> tuple[dict, dict]:
    """A trial's options as (ensemble arguments, Trainer arguments); adversarial training is on
    when an eps is swept above 0."""
    ensemble_names, trainer_names = option_names(task)
    ensemble_kwargs = {k: v for k, v in options.items() if k in ensemble_names}
    ensemble_kwargs.setdefault("use_adversarial_training", ensemble_kwargs.get("adversarial_eps", 0.0) > 0)
    return ensemble_kwargs, {k: v for k, v in options.items() if k in trainer_names}


def _run_trial(config, *, train, validation, base):
    """One Tune trial: an ensemble through the Trainer, in this process or on Ray Train workers,
    reporting the ensemble's validation metrics to Tune at each checkpoint."""
    from ray import tune
    from ray.train import LoggingConfig, RunConfig, ScalingConfig

    from .trainer import Trainer
    from .loop.training import num_steps

    ensemble_kwargs, trainer_kwargs = split_options({**base["ensemble"], **base["trainer"], **config},
                                                    base["cls"].head_class.task)
    ensemble = base["cls"](train.X.shape[1], **base["dim_out"], **ensemble_kwargs)
    # the Trainer's own rule for the run's length, so save_every splits it into num_reports reports
    steps = num_steps(len(train), trainer_kwargs.get("train_batch_size", 100),
                      trainer_kwargs.get("train_num_steps"), trainer_kwargs.get("train_num_epochs"))
    save_every = max(1, math.ceil(steps / base["num_reports"]))
    trial_id = tune.get_context().get_trial_id()
    if base["training"] == "in_trial":
        import torch

        def report(entry):
            if "val_nll" in entry:
                tune.report(tune_metrics(entry))

        torch.set_num_threads(max(1, int(base["cpus_per_worker"])))
        with tempfile.TemporaryDirectory(prefix="ray_ensembles-trial-") as folder:
            Trainer(ensemble, train, validation_dataset=validation, **trainer_kwargs, save_every=save_every,
                    results_folder=folder, cpu=not base["use_gpu"], metrics_callback=report).train()
        ensemble.save(run_ensemble_path(base["trials_dir"], trial_id))
        return
    workers = min(ensemble.num_members, base["max_workers"])
    per_worker = {"CPU": base["cpus_per_worker"], **({"GPU": 1} if base["use_gpu"] else {})}
    trainer = Trainer(
        ensemble, train, validation_dataset=validation, **trainer_kwargs, save_every=save_every,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=base["use_gpu"],
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=trial_id, storage_path=base["trials_dir"],
                             callbacks=[_tune_report_callback(ensemble.task, validation.y)],
                             logging_config=LoggingConfig(log_level="WARNING")))
    trainer.train()


def tune_metrics(entry: dict) -> dict:
    """What a trial reports to Tune from a history entry with validation metrics: the
    ensemble's, and the mean of its members' validation NLL."""
    report = {k: v for k, v in entry.items() if not isinstance(v, dict)}
    report["mean_member_val_nll"] = statistics.fmean(entry["member_val_nll"].values())
    return report


def _tune_report_callback(task, y_validation):
    from ray.tune.integration.ray_train import TuneReportCallback

    from .on_ray.distributed import report_entries
    from .on_ray.reporting import read_report

    class EnsembleTuneReportCallback(TuneReportCallback):
        """Reports the ENSEMBLE's validation metrics, formed from every worker's members, to Tune
        at each checkpoint (Tune's own callback forwards only rank 0's numbers)."""

        def __init__(self):
            super().__init__()
            self.to_entries = report_entries(task, y_validation)

        def after_report(self, run_context, metrics, checkpoint):
            report = read_report(metrics, checkpoint, validated=True)
            for entry in [] if report is None else self.to_entries(report):
                if "val_nll" in entry:
                    super().after_report(run_context, [tune_metrics(entry)], None)  # Tune's own, with our metrics

    return EnsembleTuneReportCallback()


def __getattr__(name: str):
    # hyper_ensemble builds on this module (a sweep, then selection), so it is loaded on first use
    if name == "hyper_ensemble":
        from .hyper import hyper_ensemble

        return hyper_ensemble
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
