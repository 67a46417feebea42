"""What Ray Train workers tell the driver while a run goes: progress and history.

Workers send their step and running losses to a `RunChannel` actor every few seconds (a message
nothing waits on); the controller's `EpochMetricsCallback` turns each report's checkpoint into
history entries (with the ensemble's validation metrics); in the driver, a `Follower` thread
polls the channel, moves the progress bar and emits the entries.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading

import ray
import ray.train
import torch
from safetensors.torch import load as safetensors_load

from . import storage
from .metrics import ensemble_validation_metrics
from .progress import REPORT_EVERY_S, EnsembleProgress, Every
from .training import attach_validation


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


class Follower:
    """In the driver, beside the blocking fit: polls the run's channel, moves the progress bar
    (`total` member-steps) and hands new history entries to `emit`."""

    POLL_S = 0.5

    def __init__(self, channel, emit, total: int, progress: bool):
        self.channel, self.emit, self.seen, self.val_nll = channel, emit, 0, None
        self.bar = EnsembleProgress(total, enabled=progress)
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
        self.emit(entries)
        self.val_nll = next((e["val_nll"] for e in reversed(entries) if "val_nll" in e), self.val_nll)
        if workers:
            done = sum(step * n for step, n, _ in workers.values())
            losses = [loss for _, _, member_losses in workers.values() for loss in member_losses]
            self.bar.update(done, statistics.fmean(losses), self.val_nll)

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
