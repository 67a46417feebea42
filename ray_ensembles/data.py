"""Training data: in-memory tensors or arrays, checked once."""

from __future__ import annotations

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
