"""Training data: the one interface the loop reads (`TrainingData`), and in-memory tensors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from typing import Protocol, Sequence

import numpy as np
import torch

from ..io.locations import filesystem_for
from ..model.standardize import Moments
from ..model.validation import as_float_tensor, as_labels, as_tensor, fail
from .batches import MemberBatches
from .shipping import SharedTensors


def cubic_toy(n: int, seed: int) -> "TensorDataset":
    """The paper's Figure 1 problem: x ~ U[-4, 4], y = x^3 + N(0, 3^2), n rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 8 - 4
    return TensorDataset(x, x ** 3 + 3 * torch.randn(n, 1, generator=g), feature_names=["x"])


class TrainingData(Protocol):
    """What the loop, the Trainer and the Ray shim need of training data; they never ask which
    kind it is. `TensorDataset` (in memory), `map_data.MapDataset` (a torch map-style Dataset) and
    `streaming.TableStream` (a Ray Dataset, read in windows) implement it: another kind of data is
    one more class."""

    feature_names: list[str] | None
    reader_cpus: int  # CPUs a Ray cluster must keep free for reading it (Ray Data's read tasks)

    def __len__(self) -> int: ...

    @property
    def fingerprint(self) -> str:
        """A short digest a checkpoint records, so that resuming on other data is refused."""

    def fit_standardization(self, ensemble) -> None:
        """Fit `ensemble`'s input and target statistics (and its feature names) to these rows."""

    def member_batches(self, ensemble, settings, device):
        """The loop's batches of `ensemble`'s members (`batches.MemberBatches` or one like it):
        `batches(step)`, `steps_per_epoch`, `num_rows`, `chunks(rows)`, `reset()`, `close()`."""

    def evaluation_rows(self) -> "TensorDataset | None":
        """Rows to check the trained ensemble's predictions on, if they are in memory."""

    def shipped(self):
        """What travels to a Ray Train worker in its config; its `on_worker()` gives the data there."""

    def ray_train_options(self) -> dict:
        """Options for Ray Train's trainer (its `datasets` and `dataset_config`), if any."""


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """A short digest of in-memory data: shapes, dtypes, sums and up to 4096 evenly spaced
    rows. Cheap for any size; a checkpoint resumed on other data is refused by it."""
    digest = hashlib.sha256()
    for t in (x, y):
        rows = torch.linspace(0, len(t) - 1, min(len(t), 4096)).long()
        sample = t.detach().cpu()[rows].contiguous()
        digest.update(f"{tuple(t.shape)} {t.dtype} {float(t.sum(dtype=torch.float64))}".encode())  # no float64 copy
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def scan_moments(ensemble, chunks) -> tuple[Moments, "Moments | None", torch.dtype, int]:
    """One pass over (X, y) chunks of training rows (X a tensor (n, *input shape)): the moments
    of the inputs per channel and (regression) of the targets, every chunk's targets checked by the
    ensemble; the targets' dtype, and the rows counted. Streamed tables and torch Datasets alike."""
    x_moments, y_moments, y_dtype, rows = Moments(ensemble.standardizer.channels), None, torch.float32, 0
    for X, y in chunks:
        x_moments.update_channels(X)
        y = ensemble.check_y(y, len(X)).cpu()  # Arrow's read-only arrays are copied there
        if ensemble.task == "regression":
            y_dtype, y_moments = y.dtype, y_moments or Moments(y.shape[1])  # predictions come back in it
            y_moments.update(y)
        rows += len(X)
    return x_moments, y_moments, y_dtype, rows


class TensorDataset:
    """Inputs X, (N, D) features or (N, *S) inputs of any shape (images (N, C, H, W)), and
    targets y: (N,) or (N, T) reals for regression, (N,) integer or bool labels for
    classification. Tensors, numpy arrays, pandas objects (a DataFrame's column names become the
    feature names) and lists; float64 and integer data stay exact (float64) until the ensemble
    has standardised them.

    Every member trains on all N rows; nothing is sharded.
    """

    def __init__(self, X, y, *, feature_names: Sequence[str] | None = None):
        if feature_names is None and hasattr(X, "columns") and hasattr(X, "to_numpy"):
            feature_names = [str(c) for c in X.columns]
        X = as_tensor("TensorDataset", "X", X)
        if X.ndim < 2:
            fail("TensorDataset", "X", "(N, D) features or (N, *shape) inputs, at least 2-D", f"shape {tuple(X.shape)}")
        self.X = as_float_tensor("TensorDataset", "X", X, ndim=(X.ndim,))
        y = as_tensor("TensorDataset", "y", y)
        is_labels = not (y.is_floating_point() or y.is_complex())
        self.y = as_labels("TensorDataset", "y", y) if is_labels else \
            as_float_tensor("TensorDataset", "y", y, ndim=(1, 2))
        if len(self.y) != len(self.X):
            raise ValueError(f"The 'y' parameter of TensorDataset must have one row per row of X "
                             f"({len(self.X)}). Got {len(self.y)} rows instead.")
        if feature_names is not None:
            feature_names = list(feature_names)
            table = self.X.ndim == 2  # inputs of any other shape come from one (tensor) column
            if len(feature_names) != (self.X.shape[1] if table else 1) or len(set(feature_names)) != len(feature_names):
                fail("TensorDataset", "feature_names", f"{self.X.shape[1]} distinct names, one per column of X"
                     if table else "one name, of the tensor column X comes from", feature_names)
        self.feature_names = feature_names

    @classmethod
    def from_torch(cls, dataset) -> "TensorDataset":
        """This library's dataset from a `torch.utils.data.TensorDataset(X, y)`."""
        if len(dataset.tensors) != 2:
            raise ValueError("A torch.utils.data.TensorDataset must hold two tensors, X and y. "
                             f"Got {len(dataset.tensors)} instead.")
        return cls(*dataset.tensors)

    def __len__(self):
        return len(self.X)

    def __getitem__(self, index):
        return self.X[index], self.y[index]

    # TrainingData ---------------------------------------------------------------------------------

    reader_cpus = 0

    @property
    def fingerprint(self) -> str:
        return data_fingerprint(self.X, self.y)

    def fit_standardization(self, ensemble):
        ensemble.fit_normalization(self.X, self.y)
        ensemble.feature_names = self.feature_names

    def member_batches(self, ensemble, settings, device):
        xs = ensemble.standardizer.standardize_x(self.X.to(device))                     # (N, *S)
        ys = ensemble.standardizer.standardize_y(ensemble.check_y(self.y, len(self.X)))  # (N, T) or (N,)
        return MemberBatches(xs, ys, settings.batch_size, ensemble.member_seeds)

    def evaluation_rows(self) -> "TensorDataset":
        return self

    def shipped(self) -> "SharedTensors":
        return SharedTensors(self.X, self.y, self.feature_names)

    def ray_train_options(self) -> dict:
        return {}

    def split(self, fraction: float, seed: int = 0) -> tuple["TensorDataset", "TensorDataset"]:
        """(train, validation): a random `fraction` of the rows held out, from `seed` only."""
        if not 0.0 < fraction < 1.0:
            fail("TensorDataset.split", "fraction", "in (0, 1)", fraction)
        n_val = int(round(len(self) * fraction))
        if not 1 <= n_val < len(self):
            raise ValueError(f"The 'fraction' parameter of TensorDataset.split leaves an empty part "
                             f"of {len(self)} rows. Got {fraction!r} instead.")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        parts = order[n_val:], order[:n_val]
        return tuple(TensorDataset(self.X[i], self.y[i], feature_names=self.feature_names)
                     for i in parts)


def is_arrays_file(path_or_uri) -> bool:
    """Whether `path_or_uri` names a NumPy .npz file of arrays `X` and `y` (`read_arrays`)."""
    return str(path_or_uri).split("?")[0].lower().endswith(".npz")


def read_arrays(path_or_uri: str, name: str = "data", keys: tuple[str, ...] = ("X", "y")) -> dict[str, np.ndarray]:
    """The arrays `keys` of a NumPy .npz file (np.savez), from a local path or a URI: inputs of
    any shape, images (N, C, H, W) say. Never unpickles."""
    import zipfile

    import pyarrow.fs

    filesystem, path = filesystem_for(path_or_uri, name)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        raise ValueError(f"The '{name}' parameter names a file that does not exist. Got {path_or_uri!r} instead.")
    with filesystem.open_input_file(path) as f:
        raw = f.read()
    try:
        arrays = np.load(io.BytesIO(raw), allow_pickle=False)
        if not isinstance(arrays, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not named ones (np.save, not np.savez)")
        files = arrays.files
        loaded = {k: arrays[k] for k in keys if k in files}  # an object array is refused here, never unpickled
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"The '{name}' file {path_or_uri!r} could not be read as .npz of numeric arrays "
                         f"({str(err).splitlines()[0]}).") from None
    if len(loaded) < len(keys):
        raise ValueError(f"The '{name}' file {path_or_uri!r} must hold the arrays {list(keys)} "
                         f"(np.savez(path, X=..., y=...)). Got the arrays {files} instead.")
    return loaded


def table_source(path_or_uri: str, name: str = "data"):
    """(filesystem, path, format) of a table to read: "parquet" for a folder or a .parquet / .pq
    file, "csv" for .csv or .csv.gz. The one rule for training and prediction alike."""
    import pyarrow.fs

    filesystem, path = filesystem_for(path_or_uri, name)
    info = filesystem.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ValueError(f"The '{name}' parameter names a file that does not exist. Got {path_or_uri!r} instead.")
    lower = path.lower()
    if info.type == pyarrow.fs.FileType.Directory or lower.endswith((".parquet", ".pq")):
        return filesystem, path, "parquet"
    if lower.endswith((".csv", ".csv.gz")):
        return filesystem, path, "csv"
    raise ValueError(f"The '{name}' parameter must be a Parquet file or folder (.parquet, .pq) or a CSV "
                     f"file (.csv, .csv.gz). Got {path_or_uri!r} instead.")


def mismatched_column(path_or_uri: str) -> str | None:
    """For a folder of Parquet files: a sentence naming a column whose type two of its files
    disagree on (pyarrow's own error names neither column nor file); None if they agree."""
    import pyarrow.fs
    import pyarrow.parquet

    filesystem, path = filesystem_for(path_or_uri, "data")
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return None
    files = sorted(i.path for i in filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
                   if i.type == pyarrow.fs.FileType.File and not i.base_name.startswith(("_", ".")))
    seen = {}  # column -> (its type, the first file that has it)
    for file in files:
        with contextlib.suppress(pyarrow.ArrowException, OSError):  # a file that is no table fails its read
            for field in pyarrow.parquet.read_schema(file, filesystem=filesystem):
                kind, first = seen.setdefault(field.name, (field.type, file))
                if kind != field.type:
                    return (f"The 'data' folder {path_or_uri!r} is not one table: its column {field.name!r} is "
                            f"{kind} in {first.rsplit('/', 1)[-1]} but {field.type} in {file.rsplit('/', 1)[-1]}. "
                            "Write every file with the same column types.")
    return None


def read_table(path_or_uri: str):
    """A Parquet or CSV table (`table_source`) as a pyarrow Table, from a local path or a URI."""
    import pyarrow
    import pyarrow.csv
    import pyarrow.parquet

    filesystem, path, fmt = table_source(path_or_uri)
    try:
        if fmt == "parquet":
            table = pyarrow.parquet.read_table(path, filesystem=filesystem)
        else:
            with filesystem.open_input_stream(path) as stream:
                table = pyarrow.csv.read_csv(stream)
    except (pyarrow.ArrowException, UnicodeDecodeError) as err:  # e.g. a CSV that is not UTF-8
        mismatch = mismatched_column(path_or_uri) if fmt == "parquet" else None
        raise ValueError(mismatch or f"The 'data' file {path_or_uri!r} could not be read as {fmt} ({err}).") from None
    if table.num_rows == 0:
        raise ValueError(f"The 'data' file {path_or_uri!r} has no rows.")
    return table


# Ray Data's fixed-shape tensor columns, by the names it stores in Parquet: read the same whether
# Ray Data (which registers the type) is imported in the process or not
RAY_TENSOR_TYPES = ("ray.data.arrow_tensor", "ray.data.arrow_tensor_v2")


def tensor_shape(field) -> tuple[int, ...] | None:
    """The shape of one value of a fixed-shape tensor column (Arrow's canonical
    fixed_shape_tensor, or Ray Data's tensors as `ray.data.read_images` and `from_numpy` make
    them); None for any other column of a pyarrow schema."""
    import pyarrow as pa

    if isinstance(field.type, pa.BaseExtensionType) and getattr(field.type, "shape", None) is not None:
        return tuple(int(d) for d in field.type.shape)
    metadata = field.metadata or {}
    if metadata.get(b"ARROW:extension:name", b"").decode() in RAY_TENSOR_TYPES:
        return tuple(json.loads(metadata[b"ARROW:extension:metadata"]))
    return None


def table_features(schema, target: str, features: Sequence[str] | None = None) -> list[str]:
    """The feature columns of a table with this pyarrow `schema`: `features`, or every other
    numeric column; they may not repeat or include the target, and every column used must be
    numeric. A fixed-shape tensor column (images, say) is the input alone: the only tensor
    column besides the target is the default. The one rule for in-memory and streamed tables."""
    import pyarrow.types as pat

    def numeric(name):
        field = schema.field(name)
        kind = field.type
        if tensor_shape(field) is not None:
            kind = getattr(kind, "storage_type", kind).value_type
        return pat.is_integer(kind) or pat.is_floating(kind)

    columns = schema.names
    if target not in columns:
        raise ValueError(f"The 'target' parameter must be a column of the data {columns}. "
                         f"Got {target!r} instead.")
    tensors = [c for c in columns if c != target and tensor_shape(schema.field(c)) is not None]
    if features is None:
        if len(tensors) > 1:
            raise ValueError(f"The data has several tensor columns {tensors}: the 'features' parameter must "
                             "name the one to train on. Got nothing instead.")
        features = tensors or [c for c in columns if c != target and numeric(c)]
        if not features:
            raise ValueError(f"The data has no numeric feature columns besides the target {target!r}.")
    features = list(features)
    if target in features or len(set(features)) != len(features):
        raise ValueError(f"The 'features' parameter must name distinct columns other than the target "
                         f"{target!r}. Got {features!r} instead.")
    for name in [*features, target]:
        if name not in columns:
            raise ValueError(f"The 'features' parameter names a column that the data lacks "
                             f"(columns: {columns}). Got {name!r} instead.")
        if not numeric(name):
            raise ValueError(f"Column {name!r} must be numeric. Got type {schema.field(name).type} instead.")
    if len(features) > 1 and any(c in tensors for c in features):
        raise ValueError("The 'features' parameter must name one tensor column alone (it is the whole input) "
                         f"or numeric columns. Got {features!r} instead.")
    if tensor_shape(schema.field(target)) is not None:
        raise ValueError(f"The target column {target!r} must hold one number per row. Got a tensor column instead.")
    return features


def table_input_shape(schema, features: Sequence[str]) -> tuple[int, ...]:
    """The shape of one input of a table's `features` (checked by `table_features`): (D,) for D
    numeric columns, a tensor column's own shape."""
    shape = tensor_shape(schema.field(features[0]))
    return shape if shape is not None else (len(features),)


def column_values(table, name: str) -> np.ndarray:
    """The values of one column of a pyarrow Table or record batch, keeping their precision:
    (n,) for numbers, (n, *shape) for a fixed-shape tensor column. A null, NaN or inf value is
    an error naming the column."""
    column = table.column(name)
    shape = tensor_shape(table.schema.field(name))
    if shape is None:
        values = column.to_numpy(zero_copy_only=False)
    else:  # the flat values of the tensors, whichever tensor type holds them
        chunks = [getattr(chunk, "storage", chunk) for chunk in getattr(column, "chunks", [column])]
        flat = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in chunks if len(chunk)]
        values = np.concatenate(flat) if flat else np.empty(0)
        if values.size != len(column) * math.prod(shape):
            raise ValueError(f"Column {name!r} must hold one tensor of shape {shape} per row.")
        values = values.reshape(len(column), *shape)
    if column.null_count or not np.isfinite(values).all():
        raise ValueError(f"Column {name!r} must be free of missing, NaN and inf values.")
    return values


def input_values(table, features: Sequence[str]) -> np.ndarray:
    """The inputs (n, *input shape) of a table's `features` (`table_features`): a tensor column's
    values, or the numeric columns side by side."""
    if len(features) == 1 and tensor_shape(table.schema.field(features[0])) is not None:
        return column_values(table, features[0])
    return np.stack([column_values(table, c) for c in features], 1)


def table_arrays(table, target: str, features: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(X (n, *input shape), y (n,)) of a pyarrow Table (or one block of a streamed one) whose
    columns passed `table_features`, keeping their precision."""
    return input_values(table, features), column_values(table, target)


def table_to_dataset(table, target: str, features: Sequence[str] | None = None,
                     task: str = "regression") -> TensorDataset:
    """Features and target columns of a pyarrow Table as a TensorDataset that keeps their names
    (`table_features`, `table_arrays`). Classification targets follow `as_labels`."""
    features = table_features(table.schema, target, features)
    X, y = table_arrays(table, target, features)
    if task == "classification":
        y = as_labels("table_to_dataset", "target", y)
    return TensorDataset(X, y, feature_names=features)
