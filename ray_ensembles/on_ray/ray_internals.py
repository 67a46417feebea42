"""The Ray names this package uses that Ray does not make public, in one place.
tests/test_ray_internals.py fails loudly if a Ray release moves them."""

from __future__ import annotations

import logging
import time


# The GCS's key-value store, which every process of a Ray cluster reaches without an actor of its
# own: the run channel's store (reporting.RunChannel). Keys live in this namespace.
KV_NAMESPACE = "ray_ensembles"


def kv_put(key: str, value: bytes):
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)


def kv_get(key: str) -> bytes | None:
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key, namespace=KV_NAMESPACE)


def kv_keys(prefix: str) -> list[str]:
    from ray.experimental.internal_kv import _internal_kv_list

    return [key.decode() for key in _internal_kv_list(prefix, namespace=KV_NAMESPACE)]


def kv_delete_prefix(prefix: str):
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(prefix, del_by_prefix=True, namespace=KV_NAMESPACE)


def delete_serve_app(name: str):
    """Ask Serve to delete an application without waiting for its replicas to drain: behind
    Ray's HAProxy ingress the wait took 30 s, for an app that no request reaches any more."""
    from ray import serve

    serve.delete(name, _blocking=False)


def data_parallel_trainer():
    """Ray Train V2's DataParallelTrainer: the one trainer that places processes without making a
    torch process group (TorchTrainer always makes one); it has no public import path in 2.60."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    return DataParallelTrainer


def quiet_worker_reports(level: str):
    """Ray Train 2.60 logs every report in full at INFO through a logger named by its file's
    path, which a run's LoggingConfig does not reach: give that logger, and Ray Data's, the
    run's level."""
    from ray.train.v2._internal.execution import context
    logging.getLogger(context.__file__).setLevel(level)
    quiet_ray_data(level)


def quiet_ray_data(level: str):
    """Ray Data's INFO lines (each streamed epoch's start and end) at `level`, and its warning
    that progress bars are off (`ordered_dataset` turns them off) unless `level` is INFO or lower."""
    import ray.data  # configures its loggers on import: set them after

    logging.getLogger("ray.data").setLevel(level)
    if logging.getLevelName(level) > logging.INFO:
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def ordered_dataset(dataset, execution_options):
    """A copy of a Ray Dataset with these execution options and without progress bars (a
    worker's would flood the driver's console, once per epoch): Ray Data's public API sets these
    only on the process-wide DataContext; a deep copy has a context of its own, which travels
    with it."""
    from ray.data import Dataset

    ordered = Dataset.copy(dataset, _deep_copy=True)
    ordered.context.execution_options = execution_options
    ordered.context.enable_progress_bars = False
    ordered.context.print_on_execution_start = False
    ordered.context.custom_execution_callback_classes = [
        *ordered.context.custom_execution_callback_classes, PacedExecution]
    return ordered


class PacedExecution:
    """A Ray Data execution callback (its interface, duck-typed, so that importing this module
    imports no Ray) that sleeps in the scheduling loop when a step returned at once. In 2.60 the
    loop waits on its tasks (up to 0.1 s) only while some run: a reader ahead of its consumer has
    none, and the loop then spins holding the GIL of the process that reads, the one that trains
    (benchmarks/streaming.py: 83% of a core to the loop, 23% left to training)."""

    PAUSE_S = 0.005

    def __init__(self):
        self.last = time.perf_counter()

    def before_execution_starts(self, executor):
        pass

    def on_execution_step(self, executor):
        if time.perf_counter() - self.last < self.PAUSE_S:
            time.sleep(self.PAUSE_S)
        self.last = time.perf_counter()

    def after_execution_succeeds(self, executor):
        pass

    def after_execution_fails(self, executor, error):
        pass
