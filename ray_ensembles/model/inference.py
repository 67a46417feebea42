"""Batch predictions with uncertainty, for tables of any size.

`BatchPredictor` loads an ensemble once and turns a pyarrow table of inputs into one of outputs:
the input's other (id or key) columns, then `mean`, `variance`, `aleatoric`, `epistemic` and the
bounds of the central interval (regression), or one probability per class, `entropy` and
`mutual_information` (classification), and the conformal interval or prediction set where the
ensemble has conformal scores. Features are matched by the names stored with the
ensemble, so column order and extra columns do not matter.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .ensemble import load_ensemble
from ..loop.data import input_values
from .predictions import CategoricalPrediction


def reuse_freed_memory():
    """Have glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    Prediction allocates and frees the same few-MiB activations for every chunk of rows; handed
    back, each chunk faults its memory in again page by page (docs/performance.md has the
    figures). A no-op without glibc.
    """
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 64 << 20)
    except (OSError, AttributeError):
        pass


def feature_columns(ensemble, column_names: list[str], features: list[str] | None = None) -> list[str]:
    """The input columns to feed the ensemble, in its order; a clear error for missing ones."""
    names = features or ensemble.feature_names
    if names is None:
        wanted = ("the feature columns in training order" if len(ensemble.input_shape) == 1
                  else f"the one tensor column of {tuple(ensemble.input_shape)} inputs")
        raise ValueError(f"The ensemble was saved without feature names; pass {wanted} ('features').")
    missing = [c for c in names if c not in column_names]
    if missing:
        raise ValueError(f"The data lacks the feature column(s) {missing} that the ensemble was "
                         f"trained on (it has {column_names}).")
    width = ensemble.dim_in if len(ensemble.input_shape) == 1 else 1  # inputs of any other shape: a tensor column
    if len(names) != width:
        raise ValueError(f"The ensemble takes {width} feature column(s). Got {len(names)} names instead.")
    return list(names)


def prediction_columns(ensemble, X: torch.Tensor, coverage: float = 0.9,
                       batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Output columns for inputs X (B, *input shape), in the target's original units."""
    return summary_columns(ensemble.predict(X, batch_size=batch_size), coverage)


def summary_columns(pred, coverage: float = 0.9) -> dict[str, np.ndarray]:
    """The output columns of a prediction (`Ensemble.predict`'s), one value per row."""
    conformal = pred.conformal_scores is not None  # and its conformal interval or set, if fitted
    if isinstance(pred, CategoricalPrediction):
        columns = {f"prob_{c}": p.numpy() for c, p in enumerate(pred.probs.T)}
        columns.update(entropy=pred.entropy[:, 0].numpy(),
                       mutual_information=pred.mutual_information[:, 0].numpy(),
                       predicted=pred.probs.argmax(-1).numpy())
        if conformal:
            columns.update({f"in_set_{c}": s.numpy() for c, s in enumerate(pred.prediction_set(coverage).T)})
        return columns
    lower, upper = pred.interval(coverage)
    summaries = {"mean": pred.mean, "variance": pred.variance, "aleatoric": pred.aleatoric,
                 "epistemic": pred.epistemic, f"lower_{coverage:g}": lower, f"upper_{coverage:g}": upper}
    if conformal:
        lower, upper = pred.conformal_interval(coverage)
        summaries.update({f"conformal_lower_{coverage:g}": lower, f"conformal_upper_{coverage:g}": upper})
    columns = {}
    for name, values in summaries.items():
        if values.shape[1] == 1:
            columns[name] = values[:, 0].numpy()
        else:
            columns.update({f"{name}_{d}": values[:, d].numpy() for d in range(values.shape[1])})
    return columns


class BatchPredictor:
    """Holds the ensemble (loaded once per process or Ray actor); maps input tables to output tables.

    `ensemble`: a loaded ensemble, or the folder or URI of a saved one (how Ray actors get it).
    """

    def __init__(self, ensemble, features: list[str] | None = None, coverage: float = 0.9,
                 use_gpu: bool = False, keep: list[str] | None = None):
        reuse_freed_memory()  # a predictor owns its process: the job's, or a Ray Data actor
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if isinstance(ensemble, (str, Path)):
            ensemble = load_ensemble(ensemble, map_location=device)
        self.ensemble = ensemble.to(device).eval()
        self.features, self.coverage, self.keep = features, coverage, keep

    def __call__(self, table: pa.Table) -> pa.Table:
        names = feature_columns(self.ensemble, table.column_names, self.features)
        X = input_values(table, names)  # float32 stays float32; the rest is standardised in float64
        keep = self.keep if self.keep is not None else [c for c in table.column_names if c not in names]
        out = {c: table.column(c) for c in keep}
        out.update(prediction_columns(self.ensemble, torch.from_numpy(X), self.coverage))
        return pa.table(out)

    def predict_inputs(self, X: torch.Tensor, first_row: int = 0) -> pa.Table:
        """The output table of inputs X (B, *input shape) (images, say), whose rows are numbered
        from `first_row` in the column `row`."""
        return pa.table({"row": np.arange(first_row, first_row + len(X)),
                         **prediction_columns(self.ensemble, X, self.coverage)})
