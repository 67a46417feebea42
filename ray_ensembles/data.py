"""Training data: in-memory tensors or arrays, checked once."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .validation import as_float_tensor


class TensorDataset:
    """Inputs X (N, D) and targets y: (N,) or (N, T) floats for regression, (N,) ints for labels.

    Every member trains on all N rows; nothing is sharded.
    """

    def __init__(self, X, y, *, feature_names: Sequence[str] | None = None):
        self.X = as_float_tensor("TensorDataset", "X", X, ndim=(2,))
        if isinstance(y, np.ndarray) and y.dtype.kind in "iu":
            y = torch.from_numpy(np.ascontiguousarray(y))
        if isinstance(y, torch.Tensor) and not y.is_floating_point() and y.dtype != torch.bool \
                and not y.is_complex():
            self.y = y.long()  # class labels; the classifier checks their range
        else:
            self.y = as_float_tensor("TensorDataset", "y", y, ndim=(1, 2))
        if len(self.y) != len(self.X):
            raise ValueError(f"The 'y' parameter of TensorDataset must have one row per row of X "
                             f"({len(self.X)}). Got {len(self.y)} rows instead.")
        if feature_names is not None and len(feature_names) != self.X.shape[1]:
            raise ValueError(f"The 'feature_names' parameter of TensorDataset must name the "
                             f"{self.X.shape[1]} columns of X. Got {list(feature_names)!r} instead.")
        self.feature_names = list(feature_names) if feature_names is not None else None

    def __len__(self):
        return len(self.X)

    def __getitem__(self, index):
        return self.X[index], self.y[index]

    def split(self, fraction: float, seed: int = 0) -> tuple["TensorDataset", "TensorDataset"]:
        """(train, validation): a random `fraction` of the rows held out, from `seed` only."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"The 'fraction' parameter of TensorDataset.split must be in (0, 1). "
                             f"Got {fraction!r} instead.")
        n_val = int(round(len(self) * fraction))
        if not 1 <= n_val < len(self):
            raise ValueError(f"The 'fraction' parameter of TensorDataset.split leaves an empty part "
                             f"of {len(self)} rows. Got {fraction!r} instead.")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        parts = order[n_val:], order[:n_val]
        return tuple(TensorDataset(self.X[i], self.y[i], feature_names=self.feature_names)
                     for i in parts)


def filesystem_for(path_or_uri: str, name: str = "data"):
    """(pyarrow filesystem, path) for a local path or any URI pyarrow.fs understands
    (s3://, gs://, hdfs://, file://); a clear error naming `name` for an unsupported scheme."""
    import pyarrow
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(str(path_or_uri))
    except (pyarrow.ArrowInvalid, ValueError) as err:
        if "://" in str(path_or_uri):
            raise ValueError(f"The '{name}' parameter must be a local path or a URI that pyarrow.fs "
                             f"supports. Got {path_or_uri!r} instead ({err}).") from None
        return pyarrow.fs.LocalFileSystem(), str(Path(path_or_uri).resolve())


def read_table(path_or_uri: str):
    """A Parquet or CSV file (by extension) as a pyarrow Table, from a local path or a URI."""
    import pyarrow
    import pyarrow.csv
    import pyarrow.fs
    import pyarrow.parquet

    filesystem, path = filesystem_for(path_or_uri)
    info = filesystem.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ValueError(f"The 'data' parameter names a file that does not exist. Got {path_or_uri!r} instead.")
    suffix = Path(path).suffix.lower()
    try:
        if suffix in (".parquet", ".pq") or info.type == pyarrow.fs.FileType.Directory:
            return pyarrow.parquet.read_table(path, filesystem=filesystem)
        if suffix in (".csv", ".txt", ".gz"):
            with filesystem.open_input_stream(path) as stream:
                return pyarrow.csv.read_csv(stream)
    except pyarrow.ArrowException as err:
        raise ValueError(f"The 'data' file {path_or_uri!r} could not be read ({err}).") from None
    raise ValueError(f"The 'data' parameter must be a .parquet or .csv file. Got {path_or_uri!r} instead.")


def table_to_dataset(table, target: str, features: Sequence[str] | None = None,
                     task: str = "regression") -> TensorDataset:
    """Features and target columns of a pyarrow Table as a TensorDataset that keeps their names.

    Features default to every other numeric column. Classification targets must be integers.
    """
    import pyarrow.types as pat

    columns = table.column_names
    if target not in columns:
        raise ValueError(f"The 'target' parameter must be a column of the data {columns}. "
                         f"Got {target!r} instead.")
    if features is None:
        features = [c for c in columns if c != target
                    and (pat.is_integer(table.schema.field(c).type) or pat.is_floating(table.schema.field(c).type))]
        if not features:
            raise ValueError(f"The data has no numeric feature columns besides the target {target!r}.")
    for name in [*features, target]:
        if name not in columns:
            raise ValueError(f"The 'features' parameter names a column that the data lacks "
                             f"(columns: {columns}). Got {name!r} instead.")
        kind = table.schema.field(name).type
        if not (pat.is_integer(kind) or pat.is_floating(kind)):
            raise ValueError(f"Column {name!r} must be numeric. Got type {kind} instead.")
        if table.column(name).null_count or not np.isfinite(table.column(name).to_numpy(zero_copy_only=False)).all():
            raise ValueError(f"Column {name!r} must be free of missing, NaN and inf values.")
    X = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in features], 1).astype(np.float32)
    y = table.column(target).to_numpy(zero_copy_only=False)
    if task == "classification":
        if not pat.is_integer(table.schema.field(target).type):
            raise ValueError(f"The 'target' column {target!r} of a classification task must hold "
                             f"integer labels. Got type {table.schema.field(target).type} instead.")
        y = y.astype(np.int64)
    else:
        y = y.astype(np.float32)
    return TensorDataset(X, y, feature_names=list(features))
