"""A torch map-style `Dataset` (`dataset[i]` gives row i's `(x, y)`, decoded in `__getitem__`, say)
as training data: the third kind of `TrainingData`, beside in-memory tensors and Ray Datasets.

Member m's epoch is the in-memory path's own permutation of all the rows (`members.epoch_permutations`),
so the same rows train the same members whichever kind holds them. Each step's rows, for all the
members of this process at once, are fetched by a DataLoader (with `num_workers` worker processes,
decoding ahead while the members train), then standardised as the in-memory rows are.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math

import torch
import torch.utils.data

from ..model.members import epoch_permutations
from ..model.validation import check_int, check_type
from .data import TensorDataset, scan_moments

SCAN_ROWS = 4096  # rows fetched at a time by the standardisation's pass


class MapDataset:
    """`dataset` and how many DataLoader worker processes fetch its rows (0: this process)."""

    reader_cpus = 0
    feature_names = None

    def __init__(self, dataset, num_workers: int = 0):
        check_type("MapDataset", "dataset", dataset, torch.utils.data.Dataset, "a map-style torch Dataset")
        if not callable(getattr(dataset, "__len__", None)):
            raise TypeError("The 'dataset' parameter of MapDataset must have a length (a map-style Dataset). "
                            f"Got {type(dataset).__name__} instead.")
        self.dataset, self.num_workers = dataset, check_int("MapDataset", "num_workers", num_workers, minimum=0)
        self.num_rows = len(dataset)
        if self.num_rows == 0:
            raise ValueError("The 'dataset' parameter of MapDataset must have rows. Got an empty one instead.")

    def __len__(self):
        return self.num_rows

    def loader(self, batches, workers: int | None = None):
        """The rows of each list of indices in `batches`, as (X, y), in order."""
        workers = self.num_workers if workers is None else workers
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=workers,
                                           persistent_workers=False)

    @functools.cached_property
    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to 256 evenly spaced rows, fetched here once: the checks', the fingerprint's and the
        trained ensemble's check rows."""
        rows = torch.linspace(0, self.num_rows - 1, min(self.num_rows, 256)).long().tolist()
        return next(iter(self.loader([rows], workers=0)))

    # TrainingData ---------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        X, y = self.sample
        digest = hashlib.sha256(f"{type(self.dataset).__name__} {self.num_rows} {tuple(X.shape)}".encode())
        digest.update(X.double().numpy().tobytes())
        digest.update(y.double().numpy().tobytes())
        return digest.hexdigest()[:16]

    def fit_standardization(self, ensemble):
        """One pass over the rows, SCAN_ROWS at a time: the moments of the inputs and (regression)
        of the targets, merged as a streamed table's are; every row's target checked."""
        chunks = [list(range(s, min(s + SCAN_ROWS, self.num_rows))) for s in range(0, self.num_rows, SCAN_ROWS)]
        x_moments, y_moments, y_dtype, _ = scan_moments(
            ensemble, ((ensemble.check_x(X, allow_members=False, move=False), y) for X, y in self.loader(chunks)))
        ensemble.standardizer.fit_moments(x_moments, y_moments, y_dtype)
        ensemble.feature_names = None

    def member_batches(self, ensemble, settings, device) -> "MapBatches":
        return MapBatches(self, ensemble, settings.batch_size, device)

    def evaluation_rows(self):
        return TensorDataset(*self.sample)

    def shipped(self) -> "MapDataset":
        return self  # pickled with the workers' config: the dataset must be picklable, as a DataLoader's is

    def on_worker(self) -> "MapDataset":
        return self

    def ray_train_options(self) -> dict:
        return {}


class MapBatches:
    """The loop's batches (as `MemberBatches`) of a MapDataset: `batches(step)` is every member's
    mini-batch at `step`, (M, b, *S) and (M, b, ...), fetched in order by one DataLoader from the
    step asked for onwards; asking for another step (a resume) starts a new one."""

    def __init__(self, data: MapDataset, ensemble, batch_size: int, device):
        self.data, self.ensemble, self.batch_size, self.device = data, ensemble, batch_size, device
        self.member_seeds = ensemble.member_seeds
        self.num_rows = data.num_rows
        self.steps_per_epoch = math.ceil(self.num_rows / batch_size)
        self.reset()

    def reset(self):
        """Forget the orders and the rows fetched ahead: the members' seeds changed (a restart)."""
        self._orders, self._fetched, self._next = {}, None, None

    def rows(self, step: int) -> torch.Tensor:
        """(M, b) row indices of every member's mini-batch at `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_permutations(self.member_seeds, epoch, self.num_rows)}
        b = self.batch_size
        return self._orders[epoch][:, position * b:(position + 1) * b]

    def _steps_from(self, step: int):
        for s in itertools.count(step):
            yield self.rows(s).flatten().tolist()

    def _prepare(self, X, y, members: int):
        standardizer = self.ensemble.standardizer
        xs = standardizer.standardize_x(X.to(self.device))
        ys = standardizer.standardize_y(self.ensemble.check_y(y, len(X)))
        return xs.view(members, -1, *xs.shape[1:]), ys.view(members, -1, *ys.shape[1:])

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._next != step:  # the first step, or a jump (a resume): fetch from here on
            self.close()
            self._fetched = iter(self.data.loader(self._steps_from(step)))
        X, y = next(self._fetched)
        self._next = step + 1
        return self._prepare(X, y, len(self.member_seeds))

    def chunks(self, rows: int):
        """All the rows, `rows` at a time, in order: (xs, ys) pairs, standardised."""
        starts = range(0, self.num_rows, rows)
        for X, y in self.data.loader([list(range(s, min(s + rows, self.num_rows))) for s in starts], workers=0):
            xs, ys = self._prepare(X, y, 1)
            yield xs[0], ys[0]

    def close(self):
        """Stop the DataLoader's worker processes, if any."""
        fetched, self._fetched, self._next = self._fetched, None, None
        if fetched is not None and hasattr(fetched, "_shutdown_workers"):
            fetched._shutdown_workers()
