"""Many ensembles at once (Ray's many-model pattern): k-fold splits, one ensemble per segment or
region, a benchmark's 140 splits.

Each ensemble is one unit of work: an in-process `Trainer` (the one loop, members stacked) on
one actor of a pool of long-lived Ray actors, one per CPU (or per GPU with `use_gpu`). Ray and
torch start once per actor, not once per ensemble as a Ray Train run does. Each ensemble's data
goes through the object store once; results stream back in the order they finish.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import tempfile
import time
from typing import Hashable, Iterator, Mapping

import ray
import torch

from .io import storage
from .io.locations import check_store, is_uri, join
from .loop.progress import EnsembleProgress
from .model.validation import check_bool, check_float, check_int, fail
from .on_ray.cluster import capacity
from .trainer import Trainer

# Options the pool sets itself: where checkpoints go, how progress is shown, and no Ray Train.
_NOT_PER_ENSEMBLE = {"results_folder", "scaling_config", "run_config", "progress", "metrics_callback",
                     "loggers", "cpu"}
_FOLDER_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclasses.dataclass
class FitResult:
    """One trained ensemble: `metrics` and `history` as `Trainer.metrics` and `Trainer.history`;
    `path`: where it was saved (with `storage_path`); `attempts`: 2 or more after a worker died;
    `worker_s`: seconds the actor spent on it."""

    key: Hashable
    ensemble: object
    metrics: dict
    history: list[dict]
    path: str | None
    attempts: int
    worker_s: float


@ray.remote
class _FitWorker:
    """A long-lived process that trains one ensemble per call."""

    def __init__(self, threads: int):
        torch.set_num_threads(threads)

    def fit(self, job: dict) -> dict:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ray_ensembles-fit-") as folder:
            trainer = Trainer(**job, results_folder=folder)
            ensemble = trainer.train().to("cpu")
        return {"ensemble": ensemble, "metrics": trainer.metrics, "history": trainer.history,
                "worker_s": time.perf_counter() - start}


def folder_name(key) -> str:
    """The folder an ensemble's key saves under: the key, or a tuple's parts joined by '-'."""
    return "-".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _job(key, spec, options: dict, use_gpu: bool) -> tuple[dict, int]:
    """The Trainer arguments of one ensemble and its member-steps, checked here (`Trainer.check`):
    any bad input fails before anything starts, naming the ensemble's key."""
    if isinstance(spec, Mapping):
        job = dict(spec)
    elif isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        job = dict(zip(("ensemble", "dataset", "validation_dataset"), spec))
    else:
        raise TypeError(f"The ensemble {key!r} of fit_many must be (ensemble, dataset), (ensemble, dataset, "
                        f"validation_dataset) or a dict of Trainer arguments. Got {type(spec).__name__} instead.")
    if {"train_num_steps", "train_num_epochs"} & set(job):  # its own length replaces the shared one
        options = {k: v for k, v in options.items() if k not in ("train_num_steps", "train_num_epochs")}
    job = {**options, **job}
    refused = sorted(_NOT_PER_ENSEMBLE & set(job))
    if refused or "ensemble" not in job or "dataset" not in job:
        raise ValueError(f"The ensemble {key!r} of fit_many needs 'ensemble' and 'dataset' and takes the "
                         f"Trainer's other options except {sorted(_NOT_PER_ENSEMBLE)}. Got {sorted(job)} instead.")
    job["cpu"] = not use_gpu
    try:
        settings = Trainer.check(**job, results_folder=".")
    except (TypeError, ValueError) as err:
        raise type(err)(f"The ensemble {key!r} of fit_many: {err}") from None
    return job, job["ensemble"].num_members * settings.num_steps


class EnsemblePool:
    """Long-lived Ray actors that train ensembles, one per call: `num_workers` of them (default:
    one per CPU of the cluster, or per GPU with `use_gpu`), each `cpus_per_worker` CPUs and torch
    threads. Keep one for several `fit_many` calls to start its processes once; `close()` (or a
    `with` block) ends them."""

    def __init__(self, num_workers: int | None = None, *, use_gpu: bool = False, cpus_per_worker: float = 1.0):
        owner = "EnsemblePool"
        check_bool(owner, "use_gpu", use_gpu)
        self.cpus_per_worker = check_float(owner, "cpus_per_worker", cpus_per_worker, strict_minimum=0.0)
        if num_workers is not None:
            check_int(owner, "num_workers", num_workers, minimum=1)
        have = capacity()
        fits = int(have.get("GPU", 0)) if use_gpu else int(have.get("CPU", 0) // cpus_per_worker)
        if fits < 1 or (num_workers or 0) > fits:
            raise ValueError(f"The EnsemblePool asks for {num_workers or 1} worker(s) of {cpus_per_worker:g} CPU"
                             f"{' + 1 GPU' if use_gpu else ''} but the Ray cluster has {dict(have)}.")
        self.use_gpu, self.num_workers = use_gpu, num_workers or fits
        self.actors = [self._start() for _ in range(self.num_workers)]

    def _start(self):
        return _FitWorker.options(num_cpus=self.cpus_per_worker, num_gpus=int(self.use_gpu)).remote(
            max(1, int(self.cpus_per_worker)))

    def close(self):
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def fit_many(self, ensembles: Mapping, **options) -> dict:
        """`fit_many` on this pool: {key: FitResult}, in the order of `ensembles`."""
        results = {r.key: r for r in self.iter_fit_many(ensembles, **options)}
        return {key: results[key] for key in ensembles}

    def iter_fit_many(self, ensembles: Mapping, *, storage_path=None, progress: bool = False,
                      max_retries: int = 3, **trainer_options) -> Iterator[FitResult]:
        """Yield a FitResult per ensemble as each finishes (see `fit_many`)."""
        checked = check_many(ensembles, trainer_options, storage_path, progress, max_retries, self.use_gpu)
        return self._run(checked, storage_path, progress, max_retries)

    def _run(self, checked, storage_path, progress, max_retries) -> Iterator[FitResult]:
        if not self.actors:
            raise RuntimeError("This EnsemblePool is closed.")
        jobs, work = checked
        refs = {key: ray.put(job) for key, job in jobs.items()}  # each ensemble's data, once
        bar, done = EnsembleProgress(sum(work.values()), enabled=progress, desc="fit_many"), 0
        queue, idle, running = collections.deque(jobs), list(self.actors), {}
        attempts = collections.Counter()
        try:
            while queue or running:
                while queue and idle:
                    key, actor = queue.popleft(), idle.pop()
                    attempts[key] += 1
                    running[actor.fit.remote(refs[key])] = (key, actor)
                [ref], _ = ray.wait(list(running), num_returns=1)
                key, actor = running.pop(ref)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayActorError as err:  # the process died: elsewhere, from the start
                    if attempts[key] > max_retries:
                        raise RuntimeError(f"The ensemble {key!r} of fit_many failed {attempts[key]} times: its "
                                           f"worker died each time (max_retries={max_retries}).") from err
                    idle.append(self._replace(actor))
                    queue.appendleft(key)
                    continue
                except ray.exceptions.RayTaskError as err:
                    raise RuntimeError(f"The ensemble {key!r} of fit_many failed: {err.cause}") from err.cause
                idle.append(actor)
                path = None
                if storage_path is not None:
                    path = str(out["ensemble"].save(join(storage_path, folder_name(key))))
                done += work[key]
                bar.update(done, _mean_train_loss(out["metrics"]), out["metrics"].get("val_nll"))
                yield FitResult(key, out["ensemble"], out["metrics"], out["history"], path, attempts[key],
                                out["worker_s"])
        finally:
            bar.close()
            for _, actor in running.values():  # abandoned mid-ensemble: a fresh process takes its place
                self._replace(actor)

    def _replace(self, actor):
        """A fresh process in place of `actor` (dead, or abandoned mid-ensemble)."""
        ray.kill(actor)
        self.actors.remove(actor)
        self.actors.append(self._start())
        return self.actors[-1]


def _mean_train_loss(metrics: dict) -> float | None:
    losses = [m["train_loss"] for m in metrics.get("members", {}).values()]
    return sum(losses) / len(losses) if losses else None


def check_many(ensembles, options: dict, storage_path, progress, max_retries, use_gpu: bool):
    """({key: Trainer arguments}, {key: member-steps}), every ensemble and option checked, and the
    save location: before anything starts."""
    if not isinstance(ensembles, Mapping) or not ensembles:
        fail("fit_many", "ensembles", "a non-empty dict of key -> (ensemble, dataset)", ensembles)
    check_int("fit_many", "max_retries", max_retries, minimum=0)
    check_bool("fit_many", "progress", progress)
    checked = {key: _job(key, spec, options, use_gpu) for key, spec in ensembles.items()}
    jobs = {key: job for key, (job, _) in checked.items()}
    if storage_path is not None:
        names = collections.Counter(folder_name(key) for key in jobs)
        for key in jobs:
            name = folder_name(key)
            if not _FOLDER_NAME.fullmatch(name) or name in (".", "..") or names[name] > 1:
                raise ValueError(f"The ensemble {key!r} of fit_many saves under storage_path as {name!r}, which "
                                 "must be a unique name of letters, digits, '.', '-' and '_'.")
        if is_uri(storage_path):
            check_store(storage_path, "storage_path", write=True)
        for key in jobs:  # every target before the first ensemble trains
            try:
                storage.check_ensemble_location(join(storage_path, folder_name(key)))
            except ValueError as err:
                raise ValueError(f"The ensemble {key!r} of fit_many cannot be saved under storage_path: {err}") from None
    return jobs, {key: steps for key, (_, steps) in checked.items()}


def fit_many(ensembles: Mapping, *, num_workers: int | None = None, use_gpu: bool = False,
             cpus_per_worker: float = 1.0, pool: EnsemblePool | None = None, storage_path=None,
             progress: bool = False, max_retries: int = 3, **trainer_options) -> dict:
    """Train many ensembles, each as one unit of work on a pool of long-lived Ray actors.

    `ensembles`: {key: (ensemble, dataset)}, {key: (ensemble, dataset, validation_dataset)} or
    {key: dict of Trainer arguments} (an ensemble's own options override the shared ones).
    `trainer_options`: the Trainer's options, shared by all (`train_num_epochs=40`, ...). Every
    ensemble is checked before anything starts; an error names its key. Returns {key:
    FitResult} in the order of `ensembles`; the ensembles passed in are left as they were (each
    result holds its own trained copy). An ensemble whose worker dies is trained again on
    another, from its start, to the same result (members depend on their seeds alone), up to
    `max_retries` times. `storage_path` (a folder or URI) saves each as `<storage_path>/<key>`.
    `pool`: an `EnsemblePool` to reuse (else one is started for this call: `num_workers`,
    `use_gpu`, `cpus_per_worker`). `iter_fit_many` yields the results as they finish.
    """
    results = {r.key: r for r in iter_fit_many(
        ensembles, num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, pool=pool,
        storage_path=storage_path, progress=progress, max_retries=max_retries, **trainer_options)}
    return {key: results[key] for key in ensembles}


def iter_fit_many(ensembles: Mapping, *, num_workers: int | None = None, use_gpu: bool = False,
                  cpus_per_worker: float = 1.0, pool: EnsemblePool | None = None, storage_path=None,
                  progress: bool = False, max_retries: int = 3, **trainer_options) -> Iterator[FitResult]:
    """`fit_many`, yielding each FitResult as it finishes. Bad input fails here, before Ray starts."""
    checked = check_many(ensembles, trainer_options, storage_path, progress, max_retries,
                         pool.use_gpu if pool else use_gpu)
    if pool is not None:
        return pool._run(checked, storage_path, progress, max_retries)

    def on_own_pool():
        with EnsemblePool(num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker) as own:
            yield from own._run(checked, storage_path, progress, max_retries)

    return on_own_pool()
