"""A run's history: per-epoch entries, in order, to the Trainer's `history`, its callback and its
loggers. The in-process loop records into it at each checkpoint, and on Ray the driver's
`reporting.Follower` records each report's entries into the same recorder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..model.validation import check_callable


def attach_validation(entries: list[dict], step: int, validation: dict) -> list[dict]:
    """Put validation metrics on the epoch entry that ended at `step`, or add an entry for a
    checkpoint taken mid-epoch. The in-process and Ray paths report alike through this."""
    if validation:
        if entries and entries[-1]["step"] == step:
            entries[-1].update(validation)
        else:
            entries.append({"step": step, **validation})
    return entries


@dataclasses.dataclass
class RunResult:
    """What a run on Ray or under torchrun returns. `placement`: member id -> the worker rank
    (on Ray also its node id, device and GPU ids) that trained it; `timings`: seconds (Ray only;
    workers run in parallel, so their figures are maxima)."""

    checkpoint_path: str | Path
    train_losses: dict[int, float]
    placement: dict[int, dict]
    run_name: str | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


class History:
    """Entries of the current run, each given once to `metrics_callback` and to each logger."""

    def __init__(self, metrics_callback=None, loggers=()):
        check_callable("Trainer", "metrics_callback", metrics_callback, "callable (it gets each history entry)")
        for logger in loggers:
            if not all(callable(getattr(logger, name, None)) for name in ("start", "log_epoch", "finish")):
                raise TypeError("The 'loggers' parameter of Trainer must hold objects with start, log_epoch "
                                f"and finish methods (see ray_ensembles.io.tracking). Got {logger!r} instead.")
            if callable(getattr(logger, "check", None)):
                logger.check()  # a tracker that cannot record fails here, not after training
        self.metrics_callback, self.loggers = metrics_callback, list(loggers)
        self.entries: list[dict] = []
        self.pending: list[dict] = []  # this process's epochs since its last checkpoint

    def start(self, params: dict):
        self.entries, self.pending = [], []
        for logger in self.loggers:
            logger.start(params)

    def add_epoch(self, epoch: int, step: int, member_ids, member_losses):
        self.pending.append({"epoch": epoch, "step": step, "member_train_loss": dict(zip(member_ids, member_losses))})

    def checkpoint(self, step: int, validation: dict):
        """The epochs since the last checkpoint, with the validation metrics taken at this one."""
        entries, self.pending = self.pending, []
        self.emit(attach_validation(entries, step, validation))

    def emit(self, entries: list[dict]):
        """Entries replayed after a Ray worker's restart (steps already recorded) are skipped: the
        run is deterministic, so they are the same again."""
        for entry in entries:
            if self.entries and entry["step"] <= self.entries[-1]["step"]:
                continue
            self.entries.append(entry)
            if self.metrics_callback is not None:
                self.metrics_callback(entry)
            for logger in self.loggers:
                logger.log_epoch(entry)

    def latest(self, key: str):
        """The latest value of `key` (e.g. "val_nll"), or None."""
        return next((entry[key] for entry in reversed(self.entries) if key in entry), None)

    def finish(self, metrics: dict, checkpoint_path):
        for logger in self.loggers:
            logger.finish(metrics, checkpoint_path)
