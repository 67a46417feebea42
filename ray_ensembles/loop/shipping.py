"""In-memory training data on its way to Ray Train workers. Torch-free, so that a worker that
unpickles its config does not import torch before its training module does (`trainer.timings`
would count that import as Ray Train's start)."""

from __future__ import annotations


class SharedTensors:
    """A TensorDataset's rows in the object store, once: each worker fetches them once and copies
    them into its own tensors (object-store arrays are read-only)."""

    def __init__(self, X, y, feature_names):
        import ray

        self.arrays, self.feature_names = ray.put((X.numpy(), y.numpy())), feature_names

    def on_worker(self):
        import ray
        import torch

        from .data import TensorDataset

        X, y = (torch.from_numpy(a.copy()) for a in ray.get(self.arrays))
        return TensorDataset(X, y, feature_names=self.feature_names)
