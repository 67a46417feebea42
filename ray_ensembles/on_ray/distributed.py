"""Ray Train shim: members train on Ray Train workers; a coordinator assembles the ensemble.

Each worker runs the same `EnsembleFit` loop as the in-process Trainer on a disjoint set of
members (`placement.assign_members`), on ALL the training rows. There is no process group, no
DDP and no gradient exchange: `DataParallelTrainer` with a plain `BackendConfig` only places the
processes (and with `use_gpu` gives each worker its own GPU as cuda:0). Workers write one file
per member into each Ray checkpoint; Ray merges the ranks' files into one directory, from which
failed workers resume and the coordinator assembles the ensemble.
"""

from __future__ import annotations

import time

IMPORT_STARTED = time.time()  # a Ray Train worker's import of this module: torch and the loop's modules

import contextlib  # noqa: E402
import dataclasses
import json
import os
import tempfile
import uuid
from pathlib import Path

import ray
import ray.train
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from ..io import storage
from ..io.locations import check_store, is_uri, run_ensemble_path
from ..loop import checkpoint
from ..loop.placement import assign_members, local_device
from ..model.ensemble import build_ensemble
from ..model.metrics import ensemble_validation_metrics
from .cluster import AUTOSCALING_ENV, autoscaling, capacity, join_ray
from .ray_internals import data_parallel_trainer, quiet_worker_reports
from .reporting import (Follower, ReportForwarder, RunChannel, epoch_entries, epochs_filename, progress_sender,
                        validation_filename)
from ..loop.history import History, RunResult, attach_validation
from ..loop.training import EnsembleFit, TrainSettings
from ..model.validation import check_type

IMPORTED = time.time()

# Ray Train's controller polls its workers every this many seconds (2 by default). Start-up, every
# report and the end of a run each wait for a poll (docs/performance.md).
POLL_ENV, POLL_DEFAULT_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"


def new_run_name() -> str:
    """A run name of its own: a reused name silently resumes the old run."""
    return f"ensemble-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def resources_per_worker(scaling_config) -> dict[str, float]:
    """What each worker asks for, as Ray Train reckons it: `resources_per_worker` (zeros
    dropped), else one GPU with `use_gpu` or one CPU; `use_gpu` always adds a GPU."""
    sc = scaling_config
    if sc.resources_per_worker is None:
        per = {"GPU": 1} if sc.use_gpu else {"CPU": 1}
    else:
        per = {k: v for k, v in sc.resources_per_worker.items() if v != 0}
    if sc.use_gpu:
        per.setdefault("GPU", 1)
    return per


def check_distributed_request(ensemble, scaling_config, run_config):
    """Checks that need no Ray: run at Trainer construction, before anything starts."""
    from ray.train import RunConfig, ScalingConfig

    check_type("Trainer", "scaling_config", scaling_config, ScalingConfig, "a ray.train.ScalingConfig")
    members, k = ensemble.num_members, scaling_config.num_workers
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= members:
        raise ValueError(f"The 'num_workers' of Trainer's scaling_config must be an int in "
                         f"[1, num_members={members}]: every worker trains at least one member. "
                         f"Got {k!r} instead.")
    check_type("Trainer", "run_config", run_config, (RunConfig, type(None)), "a ray.train.RunConfig")


def check_cluster_resources(scaling_config, reader_cpus: int = 0):
    """Refuse a request the cluster can never satisfy: Ray would wait for it forever. Workers
    that stream a Ray Dataset need `reader_cpus` left for its read tasks, or every read waits."""
    if autoscaling():
        return
    have = capacity()
    need_cpu = resources_per_worker(scaling_config).get("CPU", 0) * scaling_config.num_workers
    if reader_cpus and need_cpu > have.get("CPU", 0.0) - reader_cpus + 1e-9:
        raise ValueError(
            f"The scaling_config asks for {need_cpu:g} CPU of the Ray cluster's {have.get('CPU', 0.0):g}, leaving "
            "less than 1 for Ray Data's read tasks, which every worker streaming the dataset waits on. Use fewer "
            "workers or fewer CPUs in resources_per_worker (fractions are fine).")
    for resource, amount in resources_per_worker(scaling_config).items():
        need = amount * scaling_config.num_workers
        if need > have.get(resource, 0.0) + 1e-9:
            raise ValueError(
                f"The scaling_config asks for {need:g} {resource} ({scaling_config.num_workers} workers "
                f"x {amount:g}) but the Ray cluster has {have.get(resource, 0.0):g} {resource}. Use "
                f"fewer workers or resources_per_worker, or set {AUTOSCALING_ENV}=1 on a cluster "
                "that autoscales.")


def fit_on_ray(ensemble, dataset, settings: TrainSettings, *, scaling_config, run_config=None,
               results_folder, history: History, validation_dataset=None, resume_from=None,
               progress: bool = False) -> RunResult:
    """Train `ensemble` (its standardisation fitted) on `dataset` on Ray Train workers, then
    assemble its members into it and save it. History entries go to `history` as they come;
    `resume_from` is a checkpoint directory every node can read, which the workers continue."""
    from ray.train import BackendConfig, LoggingConfig, RunConfig

    sc = scaling_config
    join_ray()
    check_cluster_resources(sc, reader_cpus=dataset.reader_cpus)
    # A reused name silently resumes an old run, so a fresh run gets a unique one. Ray Train's
    # own INFO lines (each report, each checkpoint) go to its log files, not the console.
    rc = run_config or RunConfig(
        name=new_run_name(),
        storage_path=str(Path(results_folder).resolve()), logging_config=LoggingConfig(log_level="WARNING"))
    channel = RunChannel()
    config = {
        "task": ensemble.task, "ensemble_config": ensemble.config, "member_ids": ensemble.member_ids,
        "normalization": ensemble.standardizer.state(),
        "member_factory": ensemble.member_factory,  # pickled by reference: workers import it
        "settings": dataclasses.asdict(settings), "use_gpu": bool(sc.use_gpu),
        "threads": max(1, int(resources_per_worker(sc).get("CPU", 1))),
        "data": dataset.shipped(),
        "validation": None if validation_dataset is None else validation_dataset.shipped(),
        "resume_from": None if resume_from is None else str(Path(resume_from).resolve()),
        "channel": channel, "log_level": rc.logging_config.log_level,
    }
    rc = dataclasses.replace(rc, callbacks=[*(rc.callbacks or []), ReportForwarder(channel, validation_dataset is not None)])
    started = time.time()
    follower = Follower(channel, report_entries(ensemble.task, None if validation_dataset is None else validation_dataset.y),
                        history, ensemble.num_members * settings.num_steps, progress)
    try:
        with env_default(POLL_ENV, POLL_DEFAULT_S):  # the driver's value reaches the controller
            try:
                result = data_parallel_trainer()(_train_worker, train_loop_config=config, backend_config=BackendConfig(),
                                                 scaling_config=sc, run_config=rc, **dataset.ray_train_options()).fit()
            except ray.train.TrainingFailedError as err:
                check_storage_after(err, rc)
                raise
            except SystemExit:  # Ray Train's SIGINT handler aborts the run, then exits: a Ctrl-C, as in-process
                raise KeyboardInterrupt from None
    finally:
        try:
            follower.stop()
        finally:
            channel.close()
    if result.checkpoint is None:
        raise RuntimeError(f"The Ray run {rc.name} finished without a checkpoint: {result.error}")
    fit_done = time.time()
    with result.checkpoint.as_directory() as directory:
        metadata = storage.load_members(directory, ensemble)  # the coordinator
    path = ensemble.save(run_ensemble_path(rc.storage_path, rc.name))
    ensemble.eval()
    timing = [meta["timing"] for meta in metadata.values()]

    def latest(key: str) -> float:  # workers run in parallel
        return max(t[key] for t in timing)

    return RunResult(checkpoint_path=path, run_name=rc.name,
                  train_losses={m: meta["train_loss"] for m, meta in metadata.items()},
                  placement={m: meta["placement"] for m, meta in metadata.items()},
                  timings={"workers_up_s": latest("import_started") - started,  # Ray Train's start
                           "worker_import_s": max(t["imported"] - t["import_started"] for t in timing),
                           "worker_setup_s": max(t["started"] - t["entered"] for t in timing),
                           "worker_start_s": latest("started") - started,
                           "training_s": latest("training_s"), "checkpoint_s": latest("checkpoint_s"),
                           "data_wait_s": latest("data_wait_s"),
                           "ray_train_end_s": fit_done - latest("last_checkpoint"),  # the last report, the run's end
                           "ray_train_total_s": fit_done - started, "assembly_s": time.time() - fit_done})


def report_entries(task: str, y_validation):
    """A function from a forwarded report (`reporting.read_report`) to its history entries,
    with the ensemble's validation metrics formed from every member's outputs."""
    def to_entries(report: dict) -> list[dict]:
        entries = epoch_entries(report)
        if report["validation"] is None:
            return entries
        ids = report["member_ids"]
        outputs = [safetensors_load(report["validation"][m]) for m in ids]
        return attach_validation(entries, report["step"], ensemble_validation_metrics(
            task, ids, torch.stack([o["log_lik"] for o in outputs]), torch.stack([o["points"] for o in outputs]),
            y_validation))

    return to_entries


def check_storage_after(err, run_config):
    """After a failed run: if an I/O error stopped it and its storage URI does not answer now,
    an OSError that says so in one line, naming the URI; otherwise nothing (the caller re-raises)."""
    failures = [getattr(err, "controller_failure", None), *getattr(err, "worker_failures", {}).values()]
    if not is_uri(run_config.storage_path) or not any(isinstance(f, OSError) for f in failures):
        return
    try:
        check_store(run_config.storage_path, "storage_path", write=True)
    except ValueError as down:
        raise OSError(f"The Ray run {run_config.name} stopped because its storage failed. {down}. Its "
                      "checkpoints so far are kept: once the store answers, run it again with the same "
                      "name to resume (the jobs: --resume).") from err


@contextlib.contextmanager
def env_default(name: str, value: str):
    """Set an environment variable for the duration, unless the user has set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _train_worker(config):
    """Runs on each Ray Train worker: the shared loop plus reporting."""
    entered = time.time()
    quiet_worker_reports(config["log_level"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    member_ids = assign_members(config["member_ids"], context.get_world_size())[rank]
    torch.set_num_threads(config["threads"])
    data = config["data"].on_worker()
    validation = None if config["validation"] is None else config["validation"].on_worker()
    settings = TrainSettings(**config["settings"])
    ensemble = build_ensemble(config["task"], config["ensemble_config"], member_ids, config["member_factory"])
    ensemble.standardizer.load_state(config["normalization"])
    fit = EnsembleFit(ensemble, data, settings, local_device(cpu=not config["use_gpu"], index=0))
    resume = ray.train.get_checkpoint()  # this run's own, after a worker failure
    if resume is not None:
        with resume.as_directory() as directory:
            checkpoint.restore(fit, directory)
    elif config["resume_from"] is not None:
        checkpoint.restore(fit, config["resume_from"])

    timing = {"import_started": IMPORT_STARTED, "imported": IMPORTED, "entered": entered, "started": time.time(),
              "checkpoint_s": 0.0}
    # the GPU ids are Ray's (the node's numbering); inside the worker its one GPU is cuda:0
    placement = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "device": str(fit.ensemble.device),
                 "gpu_ids": [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]}
    epochs = []  # per-epoch training losses since the last report

    def on_epoch_end(epoch, member_losses):
        epochs.append({"epoch": epoch, "step": fit.step, "train_loss": member_losses.tolist()})

    def on_checkpoint(fit):
        # Reports wait for the controller's poll, so they go with checkpoints only. The epochs
        # travel in the checkpoint, not in the report's metrics, which Ray Train logs in full.
        checkpoint_start = timing["last_checkpoint"] = time.time()
        timing["training_s"] = checkpoint_start - timing["started"] - timing["checkpoint_s"]
        timing["data_wait_s"] = getattr(fit.batches, "wait_s", 0.0)  # a streamed table's reading
        with tempfile.TemporaryDirectory() as directory:
            for m, (tensors, meta) in checkpoint.member_files(fit).items():
                storage.write_member_file(Path(directory), m, tensors, dict(meta, timing=timing, placement=placement))
            (Path(directory) / epochs_filename(rank)).write_text(json.dumps(epochs))
            epochs.clear()
            if validation is not None:
                log_lik, points = fit.evaluate(validation.X, validation.y)
                for i, m in enumerate(member_ids):
                    (Path(directory) / validation_filename(m)).write_bytes(
                        safetensors_save({"log_lik": log_lik[i].contiguous(), "points": points[i].contiguous()}))
            ray.train.report({"step": fit.step, "member_ids": member_ids},
                             checkpoint=ray.train.Checkpoint.from_directory(directory))
        timing["checkpoint_s"] += time.time() - checkpoint_start

    fit.run(on_epoch_end=on_epoch_end, on_checkpoint=on_checkpoint,
            on_step=progress_sender(config["channel"], rank, settings.num_steps))
