"""The Ray names this package uses that Ray does not make public, in one place.
tests/test_ray_internals.py fails loudly if a Ray release moves them."""

from __future__ import annotations

import logging


def data_parallel_trainer():
    """Ray Train V2's DataParallelTrainer: the one trainer that places processes without making a
    torch process group (TorchTrainer always makes one); it has no public import path in 2.60."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    return DataParallelTrainer


def quiet_worker_reports(level: str):
    """Ray Train 2.60 logs every report in full at INFO through a logger named by its file's
    path, which a run's LoggingConfig does not reach: give that logger the run's level."""
    from ray.train.v2._internal.execution import context
    logging.getLogger(context.__file__).setLevel(level)
