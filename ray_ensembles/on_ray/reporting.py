"""What Ray Train workers tell the driver while a run goes: progress and history.

Workers write their step and running losses to the run's `RunChannel` (the GCS's key-value
store) every few seconds, and each report's per-epoch losses and validation outputs as side
files in its checkpoint; the controller's `ReportForwarder` sends those files, as they are, to
the channel; in the driver, a `Follower` thread polls the channel, moves the progress bar and
turns each report into history entries (the ensemble's validation metrics are formed there).

Nothing here imports torch: the controller's callback runs in a process that never trains,
where importing torch cost seconds of every fit's start (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import statistics
import threading
import uuid

import ray.train

from ..loop.progress import REPORT_EVERY_S, EnsembleProgress, Every
from .ray_internals import kv_delete_prefix, kv_get, kv_keys, kv_put


def validation_filename(member_id: int) -> str:
    """A member's validation outputs (safetensors) inside a Ray checkpoint."""
    return f"validation_{member_id:03d}.safetensors"


def epochs_filename(rank: int) -> str:
    """A Ray worker's per-epoch training losses since its last report, inside a Ray checkpoint."""
    return f"epochs_{rank:03d}.json"


def progress_sender(channel, rank: int, num_steps: int):
    """A worker's `on_step`: its step and running losses to the driver's channel, every
    REPORT_EVERY_S and at the last step. Not a Ray Train report, which would wait for the
    controller's poll: one write to the GCS, so a step costs one clock read."""
    tick = Every(REPORT_EVERY_S)

    def on_step(fit):
        if tick() or fit.step == num_steps:  # the last one too, so the driver's last poll sees it
            channel.progress(rank, fit.step, fit.ensemble.num_members, fit.running_loss().tolist())

    return on_step


class RunChannel:
    """The driver's mailbox for one run, kept in the GCS's key-value store: each worker's latest
    progress, and the reports the controller forwards, numbered in order. It has no process of
    its own (an actor cost every fit the start of a worker process); it pickles as its prefix,
    so workers and the controller each write through their own copy."""

    def __init__(self):
        self.prefix = f"run-{uuid.uuid4().hex}/"

    def progress(self, rank: int, step: int, num_members: int, losses: list[float]):
        kv_put(f"{self.prefix}progress/{rank:05d}", json.dumps([step, num_members, losses]).encode())

    def add_report(self, index: int, report: dict):
        kv_put(f"{self.prefix}report/{index:08d}", pickle.dumps(report))

    def poll(self, since: int):
        """(each worker's progress, the reports from index `since` on, in order)."""
        workers = {int(key.rsplit("/", 1)[1]): tuple(json.loads(kv_get(key)))
                   for key in kv_keys(f"{self.prefix}progress/")}
        reports = []
        while (value := kv_get(f"{self.prefix}report/{since + len(reports):08d}")) is not None:
            reports.append(pickle.loads(value))
        return workers, reports

    def close(self):
        kv_delete_prefix(self.prefix)


class Follower:
    """In the driver, beside the blocking fit: polls the run's channel, moves the progress bar
    (`total` member-steps) and records each new report's history entries (`to_entries(report)`)
    into the run's `history.History`, as the in-process loop does."""

    POLL_S = 0.5

    def __init__(self, channel, to_entries, history, total: int, progress: bool):
        self.channel, self.to_entries, self.history, self.seen = channel, to_entries, history, 0
        self.bar = EnsembleProgress(total, enabled=progress)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ray_ensembles-progress", daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(self.POLL_S):
            with contextlib.suppress(Exception):  # a poll that failed misses nothing: the next reads it all
                self.poll()

    def poll(self):
        workers, reports = self.channel.poll(self.seen)
        self.seen += len(reports)
        for report in reports:
            self.history.emit(self.to_entries(report))
        if workers:
            done = sum(step * n for step, n, _ in workers.values())
            losses = [loss for _, _, member_losses in workers.values() for loss in member_losses]
            self.bar.update(done, statistics.fmean(losses), self.history.latest("val_nll"))

    def stop(self):
        self.done.set()
        self.thread.join()
        self.poll()  # the last progress and reports
        self.bar.close()


def _read_bytes(checkpoint, name: str) -> bytes:
    with checkpoint.filesystem.open_input_file(f"{checkpoint.path}/{name}") as f:
        return f.read()


def read_report(metrics, checkpoint, validated: bool) -> dict | None:
    """One Ray Train report's side files, as they are: {"step", "member_ids", "epochs" (each
    worker's per-epoch losses), "validation" (member id -> its outputs' safetensors bytes, or
    None)}; None for a report without them."""
    if not metrics or "member_ids" not in metrics[0] or checkpoint is None:
        return None
    ids = [m for worker in metrics for m in worker["member_ids"]]
    return {"step": metrics[0]["step"], "member_ids": ids,
            "epochs": [json.loads(_read_bytes(checkpoint, epochs_filename(rank))) for rank in range(len(metrics))],
            "validation": {m: _read_bytes(checkpoint, validation_filename(m)) for m in ids} if validated else None}


def epoch_entries(report: dict) -> list[dict]:
    """A report's per-epoch history entries: each member's training loss, by member id."""
    workers = report["epochs"]
    return [{"epoch": e["epoch"], "step": e["step"],
             "member_train_loss": dict(zip(report["member_ids"], [loss for epochs in workers
                                                                  for loss in epochs[k]["train_loss"]]))}
            for k, e in enumerate(workers[0])]


class ReportForwarder(ray.train.UserCallback):
    """On the Ray Train controller: each report's side files to the driver's channel, written
    before the run can end."""

    def __init__(self, channel, validated: bool):
        self.channel, self.validated, self.sent = channel, validated, 0

    def after_report(self, run_context, metrics, checkpoint):
        report = read_report(metrics, checkpoint, self.validated)
        if report is not None:
            self.channel.add_report(self.sent, report)
            self.sent += 1
