"""Ray Train shim: members train on Ray Train workers; a coordinator assembles the ensemble.

Each worker runs the same `EnsembleFit` loop as the in-process Trainer on a disjoint set of
members (round-robin over workers), on ALL the training rows. There is no process group, no DDP
and no gradient exchange: `DataParallelTrainer` with a plain `BackendConfig` only places the
processes (and with `use_gpu` gives each worker its own GPU as cuda:0). Workers write one file
per member into each Ray checkpoint; Ray merges the ranks' files into one directory, from which
failed workers resume and the coordinator assembles the ensemble.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import ray
import ray.train
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from . import storage
from .metrics import ensemble_validation_metrics
from .progress import REPORT_EVERY_S, EnsembleProgress, Every
from .training import EnsembleFit, TrainSettings, attach_validation, make_accelerator

AUTOSCALING_ENV = "RAY_ENSEMBLES_AUTOSCALING"  # "1": the cluster grows on demand, skip the size check
# Ray Train's controller polls its workers every this many seconds (2 by default). Start-up, every
# report and the end of a run each wait for a poll: 0.2 s took 4 s off a small 2-worker fit here.
POLL_ENV, POLL_DEFAULT_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"


def assign_members(member_ids: list[int], num_workers: int) -> list[list[int]]:
    """The members each worker trains: round-robin, e.g. 5 members on 2 workers -> [0,2,4], [1,3].

    The only place that maps members to workers. A member's result never depends on it: every
    random stream comes from (seed, member id), never from the rank.
    """
    return [list(member_ids[rank::num_workers]) for rank in range(num_workers)]


def _resources_per_worker(scaling_config) -> dict[str, float]:
    return dict(scaling_config._resources_per_worker_not_none)


def check_distributed_request(trainer):
    """Checks that need no Ray: run at Trainer construction, before anything starts."""
    from ray.train import RunConfig, ScalingConfig

    sc = trainer.scaling_config
    if not isinstance(sc, ScalingConfig):
        raise TypeError("The 'scaling_config' parameter of Trainer must be a ray.train.ScalingConfig. "
                        f"Got {type(sc).__name__} instead.")
    members = trainer.ensemble.num_members
    k = sc.num_workers
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= members:
        raise ValueError(f"The 'num_workers' of Trainer's scaling_config must be an int in "
                         f"[1, num_members={members}]: every worker trains at least one member. "
                         f"Got {k!r} instead.")
    if trainer.run_config is not None and not isinstance(trainer.run_config, RunConfig):
        raise TypeError("The 'run_config' parameter of Trainer must be a ray.train.RunConfig. "
                        f"Got {type(trainer.run_config).__name__} instead.")


def check_cluster_resources(scaling_config):
    """Refuse a request the cluster can never satisfy: Ray would wait for it forever."""
    if os.environ.get(AUTOSCALING_ENV) == "1":
        return
    per_worker = _resources_per_worker(scaling_config)
    have = ray.cluster_resources()
    for resource, amount in per_worker.items():
        need = amount * scaling_config.num_workers
        if need > have.get(resource, 0.0) + 1e-9:
            raise ValueError(
                f"The scaling_config asks for {need:g} {resource} ({scaling_config.num_workers} workers "
                f"x {amount:g}) but the Ray cluster has {have.get(resource, 0.0):g} {resource}. Use "
                f"fewer workers or resources_per_worker, or set {AUTOSCALING_ENV}=1 on a cluster "
                "that autoscales.")


def fit_on_ray(trainer):
    """Train `trainer.ensemble` on Ray Train workers, then assemble and save it."""
    from ray.train import BackendConfig, LoggingConfig, RunConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    ensemble, sc = trainer.ensemble, trainer.scaling_config
    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS or a running cluster, else starts a local one
    check_cluster_resources(sc)

    dataset = trainer.dataset
    trainer.prepare_normalization()
    validation = trainer.validation_dataset
    config = {
        "task": ensemble.task, "ensemble_config": ensemble.config,
        "member_ids": ensemble.member_ids, "normalization": ensemble.normalization_state(),
        "member_factory": ensemble.member_factory,  # pickled by reference: workers import it
        "settings": dataclasses.asdict(trainer.settings), "use_gpu": bool(sc.use_gpu),
        "threads": max(1, int(_resources_per_worker(sc).get("CPU", 1))),
        # one copy in the object store; each worker fetches it once
        "data": ray.put((dataset.X.numpy(), dataset.y.numpy())),
        "validation": None if validation is None else ray.put((validation.X.numpy(), validation.y.numpy())),
        "fault": getattr(trainer, "_fault_injection", None),
        # Trainer.load: the workers continue this checkpoint (a folder every node must see)
        "resume_from": None if trainer.resume_path is None else str(Path(trainer.resume_path).resolve()),
    }
    # A reused name silently resumes an old run, so a fresh run gets a unique one. Ray Train's
    # own INFO lines (each report, each checkpoint) go to its log files, not the console.
    rc = trainer.run_config or RunConfig(
        name=f"ensemble-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        storage_path=str(Path(trainer.results_folder).resolve()),
        logging_config=LoggingConfig(log_level="WARNING"))
    # on the driver's node: a zero-CPU actor could land on a node that is later lost
    channel = RunChannel.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote()
    config.update(channel=channel, log_level=rc.logging_config.log_level)
    rc = dataclasses.replace(rc, callbacks=[*(rc.callbacks or []), EpochMetricsCallback(
        ensemble.task, None if validation is None else validation.y, channel)])
    started = time.time()
    follower = _Follower(trainer, channel)
    try:
        with _env_default(POLL_ENV, POLL_DEFAULT_S):  # the driver's value reaches the controller
            result = DataParallelTrainer(_train_worker, train_loop_config=config,
                                         backend_config=BackendConfig(), scaling_config=sc,
                                         run_config=rc).fit()
    finally:
        try:
            follower.stop()
        finally:
            ray.kill(channel)
    if result.checkpoint is None:
        raise RuntimeError(f"The Ray run {rc.name} finished without a checkpoint: {result.error}")
    fit_done = time.time()
    with result.checkpoint.as_directory() as directory:
        member_metadata = assemble(directory, ensemble)
    trainer.checkpoint_path = _publish(ensemble, rc.storage_path, rc.name)
    trainer.run_name = rc.name
    trainer.placement = {m: meta["placement"] for m, meta in member_metadata.items()}
    worker_timing = [meta["timing"] for meta in member_metadata.values()]
    trainer.timings = {  # seconds; workers run in parallel, so their figures are maxima
        "worker_start_s": max(t["started"] for t in worker_timing) - started,
        "training_s": max(t["training_s"] for t in worker_timing),
        "checkpoint_s": max(t["checkpoint_s"] for t in worker_timing),
        "ray_train_total_s": fit_done - started,
        "assembly_s": time.time() - fit_done}
    ensemble.eval()
    return member_metadata


@contextlib.contextmanager
def _env_default(name: str, value: str):
    """Set an environment variable for the duration, unless the user has set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def assemble(directory, ensemble) -> dict[int, dict]:
    """The coordinator: load every member of `ensemble` from a run's merged checkpoint.

    Checks that every member is present, trained with this ensemble's configuration, and at the
    same step. Returns each member's metadata (seed, step, final training loss).
    """
    directory = Path(directory)
    missing = [m for m in ensemble.member_ids
               if not (directory / storage.member_filename(m)).exists()]
    if missing:
        present = sorted(p.name for p in directory.glob("member_*.safetensors"))
        raise ValueError(f"The checkpoint {directory} lacks members {missing} of {ensemble.member_ids} "
                         f"(it holds {present}).")
    metadata = {}
    for i, m in enumerate(ensemble.member_ids):
        tensors, meta = storage.read_member_file(directory / storage.member_filename(m))
        if meta.get("task") != ensemble.task or meta.get("config") != ensemble.config \
                or meta.get("member_id") != m:
            raise ValueError(f"Member file {directory / storage.member_filename(m)} belongs to another "
                             f"ensemble (task {meta.get('task')}, config {meta.get('config')}).")
        ensemble.members.load_member_state(i, storage.strip_prefix(tensors, "model."))
        ensemble.member_seeds[i] = meta["seed"]
        metadata[m] = meta
    steps = {meta["training"]["step"] for meta in metadata.values()}
    if len(steps) != 1:
        raise ValueError(f"The checkpoint {directory} mixes members from steps {sorted(steps)}.")
    return metadata


def _publish(ensemble, storage_path: str, name: str) -> str | Path:
    """Save the assembled ensemble as `<storage_path>/<name>/ensemble` (local path or URI)."""
    import pyarrow.fs

    if "://" not in storage_path:
        return ensemble.save(Path(storage_path) / name / "ensemble")
    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    with tempfile.TemporaryDirectory() as tmp:
        local = ensemble.save(Path(tmp) / "ensemble")
        pyarrow.fs.copy_files(str(local), f"{root.rstrip('/')}/{name}/ensemble",
                              destination_filesystem=filesystem)
    return f"{storage_path.rstrip('/')}/{name}/ensemble"


def _worker_ensemble(config, member_ids):
    from .ensemble import DeepEnsemble, DeepEnsembleClassifier

    cls = DeepEnsemble if config["task"] == "regression" else DeepEnsembleClassifier
    ensemble = cls(**dict(config["ensemble_config"], member_factory=config["member_factory"]),
                   num_members=len(member_ids), member_ids=member_ids)
    ensemble.load_normalization_state(config["normalization"])
    return ensemble


def _train_worker(config):
    """Runs on each Ray Train worker: the shared loop plus reporting."""
    # Ray Train 2.60 logs every report in full at INFO through a logger named by its file path,
    # which the run's LoggingConfig does not reach: that logger gets the run's level
    from ray.train.v2._internal.execution import context as train_context
    logging.getLogger(train_context.__file__).setLevel(config["log_level"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    member_ids = assign_members(config["member_ids"], context.get_world_size())[rank]
    torch.set_num_threads(config["threads"])
    # object-store arrays are read-only: copy them once into this worker's own tensors
    x, y = (torch.from_numpy(a.copy()) for a in ray.get(config["data"]))
    validation = None
    if config["validation"] is not None:
        validation = tuple(torch.from_numpy(a.copy()) for a in ray.get(config["validation"]))
    settings = TrainSettings(**config["settings"])
    fit = EnsembleFit(_worker_ensemble(config, member_ids), x, y, settings,
                      make_accelerator(cpu=not config["use_gpu"]))
    checkpoint = ray.train.get_checkpoint()  # this run's own, after a worker failure
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            fit.restore(directory)
    elif config["resume_from"] is not None:
        fit.restore(config["resume_from"])

    timing = {"started": time.time(), "checkpoint_s": 0.0}
    # the GPU ids are Ray's (the node's numbering); inside the worker its one GPU is cuda:0
    placement = {"rank": rank, "device": str(fit.ensemble.device),
                 "gpu_ids": [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]}
    epochs = []  # per-epoch training losses since the last report

    def on_epoch_end(epoch, member_losses):
        epochs.append({"epoch": epoch, "step": fit.step, "train_loss": member_losses.tolist()})

    def on_checkpoint(fit):
        # Reports are rare on purpose: each waits for the controller's poll (POLL_ENV), so they
        # go with checkpoints only. The epochs travel in the checkpoint, not in the report's
        # metrics, which Ray Train logs in full.
        checkpoint_start = time.time()
        timing["training_s"] = checkpoint_start - timing["started"] - timing["checkpoint_s"]
        with tempfile.TemporaryDirectory() as directory:
            for m, (tensors, meta) in fit.member_files().items():
                storage.write_member_file(Path(directory), m, tensors, dict(meta, timing=timing, placement=placement))
            (Path(directory) / storage.epochs_filename(rank)).write_text(json.dumps(epochs))
            epochs.clear()
            if validation is not None:
                log_lik, points = fit.evaluate(*validation)
                for i, m in enumerate(member_ids):
                    (Path(directory) / storage.validation_filename(m)).write_bytes(
                        safetensors_save({"log_lik": log_lik[i].contiguous(), "points": points[i].contiguous()}))
            ray.train.report({"step": fit.step, "member_ids": member_ids},
                             checkpoint=ray.train.Checkpoint.from_directory(directory))
        timing["checkpoint_s"] += time.time() - checkpoint_start
        _maybe_crash(config["fault"], rank, fit.step)

    fit.run(on_epoch_end=on_epoch_end, on_checkpoint=on_checkpoint,
            on_step=progress_sender(config["channel"], rank, settings.num_steps))


def progress_sender(channel, rank: int, num_steps: int):
    """A worker's `on_step`: its step and running losses to the driver's channel, every
    REPORT_EVERY_S and at the last step. Not a Ray Train report, which would wait for the
    controller's poll: a message that nothing waits on, so a step costs one clock read."""
    tick = Every(REPORT_EVERY_S)

    def on_step(fit):
        last = fit.step == num_steps
        if tick() or last:
            sent = channel.progress.remote(rank, fit.step, fit.ensemble.num_members, fit.running_loss().tolist())
            if last:
                ray.get(sent)  # in before the run ends, so the driver's last poll sees it

    return on_step


def _maybe_crash(fault, rank, step):
    """Test hook: kill this worker process once, right after a checkpoint at `after_step`."""
    if fault and rank == fault["rank"] and step >= fault["after_step"] \
            and not os.path.exists(fault["marker"]):
        Path(fault["marker"]).touch()
        time.sleep(1.5)  # let the controller commit the checkpoint first
        os._exit(1)


@ray.remote(num_cpus=0)
class RunChannel:
    """The driver's mailbox for one run: each worker's latest progress (a message every few
    seconds), and the history entries the controller forms at each report (one message per
    report, however many epochs it holds)."""

    def __init__(self):
        self.workers, self.entries = {}, []

    def progress(self, rank: int, step: int, num_members: int, losses: list[float]):
        self.workers[rank] = (step, num_members, losses)

    def add_entries(self, entries: list[dict]):
        self.entries.extend(entries)

    def poll(self, since: int):
        """(each worker's progress, the entries from index `since` on)."""
        return self.workers, self.entries[since:]


class _Follower:
    """In the driver, beside the blocking fit: polls the run's channel, moves the trainer's
    progress bar and hands new history entries to `trainer.emit` (callback and loggers)."""

    POLL_S = 0.5

    def __init__(self, trainer, channel):
        self.trainer, self.channel, self.seen = trainer, channel, 0
        members, steps = trainer.ensemble.num_members, trainer.settings.num_steps
        self.bar = EnsembleProgress(members * steps, enabled=trainer.progress)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ray_ensembles-progress", daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(self.POLL_S):
            with contextlib.suppress(ray.exceptions.RayError):  # missed entries come with the next poll
                self.poll()

    def poll(self):
        workers, entries = ray.get(self.channel.poll.remote(self.seen))
        self.seen += len(entries)
        self.trainer.emit(entries)
        if workers:
            done = sum(step * n for step, n, _ in workers.values())
            losses = [loss for _, _, member_losses in workers.values() for loss in member_losses]
            self.bar.update(done, statistics.fmean(losses), self.trainer.latest("val_nll"))

    def stop(self):
        self.done.set()
        self.thread.join()
        self.poll()  # the last progress and entries
        self.bar.close()


def _read_bytes(checkpoint, name: str) -> bytes:
    with checkpoint.filesystem.open_input_file(f"{checkpoint.path}/{name}") as f:
        return f.read()


class EpochMetricsCallback(ray.train.UserCallback):
    """On the Ray Train controller: turn the workers' reports into ensemble metrics.

    Each report's checkpoint holds every worker's per-epoch training losses since the previous
    report, and with validation data each member's validation outputs, from which the ensemble's
    NLL is formed. The entries of one report go to the driver's channel in one message.
    """

    def __init__(self, task: str, y_validation, channel=None):
        self.task, self.y_validation, self.channel = task, y_validation, channel

    def entries(self, metrics, checkpoint) -> list[dict]:
        """The per-epoch entries of one report (validation metrics on the one at its step)."""
        if not metrics or "member_ids" not in metrics[0] or checkpoint is None:
            return []
        ids = [m for worker in metrics for m in worker["member_ids"]]
        workers = [json.loads(_read_bytes(checkpoint, storage.epochs_filename(rank)))
                   for rank in range(len(metrics))]
        entries = [{"epoch": e["epoch"], "step": e["step"],
                    "member_train_loss": dict(zip(ids, [loss for epochs in workers
                                                        for loss in epochs[k]["train_loss"]]))}
                   for k, e in enumerate(workers[0])]
        if self.y_validation is not None:
            outputs = [safetensors_load(_read_bytes(checkpoint, storage.validation_filename(m))) for m in ids]
            attach_validation(entries, metrics[0]["step"], ensemble_validation_metrics(
                self.task, ids, torch.stack([o["log_lik"] for o in outputs]),
                torch.stack([o["points"] for o in outputs]), self.y_validation))
        return entries

    def after_report(self, run_context, metrics, checkpoint):
        entries = self.entries(metrics, checkpoint)
        if entries and self.channel is not None:
            ray.get(self.channel.add_entries.remote(entries))  # in before the run can end
