"""Deep Ensembles (Lakshminarayanan et al., 2017), trained as independent members, on Ray."""

import importlib

from ._version import __version__

# The public names load on first use, so that a process that needs only a torch-free module of
# this package (Ray's controller, the run's channel, a job's --help) never imports torch.
_EXPORTS = {
    "TensorDataset": "loop.data", "MapDataset": "loop.map_data",
    "DeepEnsemble": "model.ensemble", "DeepEnsembleClassifier": "model.ensemble", "combine": "model.ensemble",
    "EnsemblePool": "many", "FitResult": "many", "fit_many": "many", "iter_fit_many": "many",
    "CategoricalPrediction": "model.predictions", "GaussianMixturePrediction": "model.predictions",
    "MemberPrediction": "model.predictions", "Trainer": "trainer", "MemberDivergedError": "loop.training",
    "horizon_lr": "loop.training",
    "RandomCrop": "loop.augmentation", "RandomHorizontalFlip": "loop.augmentation", "Compose": "loop.augmentation",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
