"""Training on a Ray Dataset larger than memory: every member streams every row, in its own order.

Order. A process reads the dataset in the dataset's own order (Ray Data with `preserve_order`),
whole, and cuts it into windows of `shuffle_buffer_rows` rows (rounded down to a multiple of the
batch size; the last window holds the rest). Member m's epoch e visits the windows in that order
and each window's rows in its own permutation, drawn from (member seed, epoch, window) only
(`members.epoch_permutations`). So a member's order does not depend on the members or workers
beside it, nor on where a run resumed; the members of one process share each window's reading.
Rows move only within their window: with one window (a table of at most `shuffle_buffer_rows`
rows) each epoch is a full permutation, the in-memory path's own; with K windows, row i is
trained in the epoch's k-th K-th where k is its window, whatever the epoch. Store a table whose
rows are sorted (by time, by label) shuffled once, or the windows follow the sort order.

Memory per process, whatever the length of the table: at most three windows (the one training,
one ready, one being read on a background thread) and Ray Data's blocks in flight. A table of
one window is read once and held for every epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import queue
import sys
import threading
import time
from typing import Sequence

import torch

from ..loop.batches import MemberBatches
from ..loop.data import scan_moments, table_arrays, table_features, table_input_shape
from ..model.standardize import Moments


CHUNK_ROWS = 1 << 16  # rows of a block converted at a time


def execution_options():
    """Ray Data's options for every read of a streamed table: blocks in the dataset's own order.
    (A limit on its object-store memory slowed the reading by a third and saved nothing: its
    share of the store is bounded already, whatever the table; benchmarks/streaming.py.)"""
    from ray.data import ExecutionOptions

    return ExecutionOptions(preserve_order=True)


def is_ray_dataset(value) -> bool:
    """Whether `value` is a Ray Dataset, without importing Ray Data when nothing has."""
    data = sys.modules.get("ray.data")
    return data is not None and isinstance(value, data.Dataset)


@dataclasses.dataclass
class TableStream:
    """A Ray Dataset (or, on a Ray Train worker, the iterator over all of it) read as training
    data: its `features` and `target` columns, checked against the schema and counted before
    anything trains; inputs of `input_shape`, (D,) for D numeric columns or one tensor column's
    shape. `fingerprint` identifies it for resuming: schema, columns and rows."""

    target: str
    features: list[str]
    input_shape: tuple[int, ...]
    task: str
    num_rows: int
    fingerprint: str
    dataset: object = None  # a Ray Dataset or DataIterator; not sent to workers (Ray Train's DataConfig is)

    @classmethod
    def of(cls, dataset, target: str, features: Sequence[str] | None, task: str) -> "TableStream":
        from .ray_internals import ordered_dataset

        if not isinstance(target, str):
            raise TypeError(f"The 'target' parameter of Trainer must be a column name, for a Ray Dataset. "
                            f"Got {target!r} instead.")
        schema = dataset.schema()
        if schema is None:
            raise ValueError("The 'dataset' parameter of Trainer must be a Ray Dataset with rows. Got an empty one instead.")
        schema = schema.base_schema
        if not hasattr(schema, "field"):
            raise TypeError(f"The 'dataset' parameter of Trainer must be a Ray Dataset of Arrow tables. "
                            f"Got one with a {type(schema).__name__} schema instead.")
        features = table_features(schema, target, features)
        num_rows = dataset.count()  # from the files' metadata where it can be
        if num_rows == 0:
            raise ValueError("The 'dataset' parameter of Trainer must be a Ray Dataset with rows. Got an empty one instead.")
        digest = hashlib.sha256(f"{schema} {features} {target} {num_rows}".encode()).hexdigest()[:16]
        return cls(target, features, table_input_shape(schema, features), task, num_rows, digest,
                   ordered_dataset(dataset, execution_options()))

    def __len__(self):
        return self.num_rows

    # TrainingData ---------------------------------------------------------------------------------

    reader_cpus = 1  # every worker streaming the table waits on Ray Data's read tasks

    @property
    def feature_names(self) -> list[str]:
        return self.features

    def fit_standardization(self, ensemble):
        ensemble.standardizer.fit_moments(*self.scan(ensemble))  # one pass over the table
        ensemble.feature_names = self.features

    def member_batches(self, ensemble, settings, device) -> "StreamBatches":
        return StreamBatches(self, ensemble, settings.batch_size, settings.shuffle_buffer_rows, device,
                             settings.num_steps)

    def evaluation_rows(self) -> None:
        return None

    def shipped(self) -> "TableStream":
        return dataclasses.replace(self, dataset=None)  # Ray Train's DataConfig gives each worker the dataset

    def on_worker(self) -> "TableStream":
        import ray.train

        return dataclasses.replace(self, dataset=ray.train.get_dataset_shard("train"))

    def ray_train_options(self) -> dict:
        """Every worker gets all of the dataset (no shards), in the dataset's own order."""
        from ray.train import DataConfig

        return {"datasets": {"train": self.dataset},
                "dataset_config": DataConfig(datasets_to_split=[], execution_options=execution_options())}

    def blocks(self):
        """The table's rows in the dataset's own order, CHUNK_ROWS at a time: (X (n, *input_shape), y (n,))
        numpy arrays, every column checked (`table_arrays`): a bad value fails at its chunk.
        Converting a chunk, not a block, keeps the copies small whatever size Ray Data's blocks
        are (up to its target_max_block_size, 128 MiB by default)."""
        for block in self.dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            for start in range(0, block.num_rows, CHUNK_ROWS):
                yield table_arrays(block.slice(start, CHUNK_ROWS), self.target, self.features)

    def scan(self, ensemble) -> tuple[Moments, Moments | None, torch.dtype]:
        """One pass: the moments of the inputs and (regression) of the targets, every block's
        targets checked by the ensemble as in memory. Fails before training on the first bad block."""
        x_moments, y_moments, y_dtype, rows = scan_moments(ensemble, ((torch.from_numpy(X), y) for X, y in self.blocks()))
        if rows != self.num_rows:
            raise ValueError(f"The 'dataset' parameter of Trainer gave {rows} rows on reading, not the "
                             f"{self.num_rows} it counted: a dataset must give the same rows each time it is read.")
        return x_moments, y_moments, y_dtype


class StreamBatches:
    """The loop's batches (as `MemberBatches`) of a TableStream: `batches(step)` is every
    member's mini-batch at `step`, a pure function of (member seeds, step); the windows are read
    ahead on a background thread, once for all the members, up to the last of `num_steps` (None:
    without end)."""

    def __init__(self, stream: TableStream, ensemble, batch_size: int, shuffle_buffer_rows: int, device,
                 num_steps: int | None = None):
        self.stream, self.ensemble, self.batch_size, self.device = stream, ensemble, batch_size, device
        self.member_seeds = ensemble.member_seeds
        self.num_rows = stream.num_rows
        self.window_rows = max(1, shuffle_buffer_rows // batch_size) * batch_size
        self.num_windows = math.ceil(self.num_rows / self.window_rows)
        self.steps_per_window = self.window_rows // batch_size
        self.steps_per_epoch = math.ceil(self.num_rows / batch_size)
        # the reader stops after the run's last epoch: reading on began a Ray Data execution that
        # the end of the run then waited on (8 s of a 27 s run here)
        self.last_epoch = math.inf if num_steps is None else (num_steps - 1) // self.steps_per_epoch
        self._window = None   # (epoch, k, MemberBatches of window k)
        self._reader, self._reader_next = None, None
        self.wait_s = 0.0  # the training thread's wait for windows: what reading costs it

    def _prepare(self, X, y) -> tuple[torch.Tensor, torch.Tensor]:
        standardizer = self.ensemble.standardizer
        xs = standardizer.standardize_x(torch.from_numpy(X)).to(self.device)
        return xs, standardizer.standardize_y(self.ensemble.check_y(y, len(y)))

    def windows(self, epoch: int, first: int = 0):
        """(epoch, k, xs, ys) of windows k >= first of `epoch`, then of every later epoch: the
        standardised rows of window k. Rows before window `first` are read and skipped. A table
        of one window is read once: its window is held in memory anyway, and each read of a Ray
        Dataset costs seconds of Ray Data's start-up."""
        if self.num_windows == 1:
            reading = self._read(epoch, 0)
            _, _, xs, ys = next(reading)
            reading.close()
            while epoch <= self.last_epoch:
                yield epoch, 0, xs, ys
                epoch += 1
            return
        yield from self._read(epoch, first)

    def _read(self, epoch: int, first: int):
        while epoch <= self.last_epoch:
            skip, parts, held, k = first * self.window_rows, [], 0, first
            for X, y in self.stream.blocks():
                if skip >= len(X):
                    skip -= len(X)
                    continue
                X, y, skip = X[skip:], y[skip:], 0
                while len(X):
                    take = min(len(X), self.window_rows - held)
                    parts.append(self._prepare(X[:take], y[:take]))
                    held, X, y = held + take, X[take:], y[take:]
                    if held == self.window_rows:
                        yield (epoch, k, *(torch.cat(t) for t in zip(*parts)))
                        parts, held, k = [], 0, k + 1
            if held:
                yield (epoch, k, *(torch.cat(t) for t in zip(*parts)))
            epoch, first = epoch + 1, 0

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position = divmod(step, self.steps_per_epoch)
        k, q = divmod(position, self.steps_per_window)
        if self._window is None or self._window[:2] != (epoch, k):
            if self._reader is None or self._reader_next != (epoch, k):  # the first step, or a resume
                self.close()
                self._reader = WindowReader(self.windows(epoch, k))
            waited = time.perf_counter()
            _, _, xs, ys = self._reader.next()
            self.wait_s += time.perf_counter() - waited
            self._reader_next = (epoch, k + 1) if k + 1 < self.num_windows else (epoch + 1, 0)
            # with one window, the order is the in-memory path's: a permutation of all the rows
            self._window = (epoch, k, MemberBatches(xs, ys, self.batch_size, self.member_seeds,
                                                    None if self.num_windows == 1 else k))
        batches = self._window[2]
        return batches(epoch * batches.steps_per_epoch + q)

    def reset(self):
        """After a member's seed changed: the orders are drawn again, the rows kept."""
        if self._window is not None:
            self._window[2].reset()

    def chunks(self, rows: int):
        """All the rows, `rows` at a time, read afresh: (xs, ys) pairs."""
        for X, y in self.stream.blocks():
            for start in range(0, len(X), rows):
                yield self._prepare(X[start:start + rows], y[start:start + rows])

    def close(self):
        if self._reader is not None:
            self._reader.stop()
            self._reader = None


class WindowReader:
    """Runs a generator of windows on a thread, one window ahead of its consumer; an error in it
    is raised in the consumer, at the window that failed."""

    def __init__(self, windows):
        self._windows, self._queue, self._stop = windows, queue.Queue(maxsize=1), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="window-reader")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for window in self._windows:
                if not self._put((None, window)):
                    break
        except BaseException as err:
            self._put((err, None))
        finally:
            self._windows.close()

    def next(self):
        error, window = self._queue.get()
        if error is not None:
            raise error
        return window

    def stop(self):
        self._stop.set()
        self._thread.join()
