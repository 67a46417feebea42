"""The Trainer's data as a user gives it (a TensorDataset, a torch one, a map-style torch Dataset,
or a Ray Dataset with its column names), checked against the ensemble and turned into the loop's
`TrainingData`."""

from __future__ import annotations

import torch.utils.data

from .loop.data import TensorDataset, TrainingData
from .loop.map_data import MapDataset
from .model.ensemble import Ensemble
from .model.validation import check_type
from .on_ray.streaming import TableStream, is_ray_dataset

KINDS = "a TensorDataset, a map-style torch Dataset or a Ray Dataset"


def check_datasets(ensemble, dataset, validation_dataset, target=None, features=None
                   ) -> tuple[TrainingData, TensorDataset | None]:
    """The Trainer's data, as TensorDatasets (a torch one is converted), or a Ray Dataset as a
    TableStream of its `target` and `features` columns, checked against the ensemble: a wrong
    width, target shape, label or column fails here, before anything starts (a streamed table's
    values, at the scan that fits the standardisation)."""
    check_type("Trainer", "ensemble", ensemble, Ensemble, "a DeepEnsemble or DeepEnsembleClassifier")
    if ensemble.is_combined:
        raise ValueError("The 'ensemble' parameter of Trainer must be one configuration of members. Got one "
                         "combined from several (combine) instead: train each of its parts as an ensemble of its own.")
    validation_dataset = check_tensor_dataset(ensemble, "validation_dataset", validation_dataset)
    if is_ray_dataset(dataset):
        stream = TableStream.of(dataset, target, features, ensemble.task)
        if stream.input_shape != ensemble.input_shape:
            table = len(ensemble.input_shape) == 1
            raise ValueError("The 'features' parameter of Trainer must name " + (
                f"dim_in={ensemble.dim_in} numeric columns" if table else
                f"a tensor column of the ensemble's input shape {ensemble.input_shape} (dim_in)") +
                f". Got {stream.features}, inputs of shape {stream.input_shape}, instead.")
        return stream, validation_dataset
    if target is not None or features is not None:
        raise ValueError("The 'target' and 'features' parameters of Trainer name the columns of a Ray Dataset. "
                         f"Got them with a {type(dataset).__name__} instead.")
    if isinstance(dataset, MapDataset) or (isinstance(dataset, torch.utils.data.Dataset)
                                           and not isinstance(dataset, torch.utils.data.TensorDataset)):
        return check_map_dataset(ensemble, dataset), validation_dataset
    if dataset is None:
        raise TypeError(f"The 'dataset' parameter of Trainer must be {KINDS}. Got NoneType instead.")
    return check_tensor_dataset(ensemble, "dataset", dataset), validation_dataset


def check_map_dataset(ensemble, dataset) -> MapDataset:
    """A map-style torch Dataset (or a MapDataset), its rows' width and targets checked on a sample."""
    data = dataset if isinstance(dataset, MapDataset) else MapDataset(dataset)
    X, y = data.sample
    check_input_rows(ensemble, "dataset", X)
    ensemble.check_y(y, len(X))
    return data


def check_tensor_dataset(ensemble, name: str, data) -> TensorDataset | None:
    if isinstance(data, torch.utils.data.TensorDataset):
        data = TensorDataset.from_torch(data)
    if data is not None:
        if not isinstance(data, TensorDataset):
            check_type("Trainer", name, data, TensorDataset, KINDS if name == "dataset" else "a TensorDataset")
        check_input_rows(ensemble, name, data.X)
        ensemble.check_y(data.y, len(data))
    return data


def check_input_rows(ensemble, name: str, X):
    """Rows X (N, *shape) of the ensemble's input shape, or a ValueError naming the Trainer's `name`."""
    shape = ensemble.input_shape
    if tuple(X.shape[1:]) != shape:
        table = len(shape) == 1
        expected = f"dim_in={ensemble.dim_in} input columns (inputs of shape {shape})" if table else \
            f"inputs of shape {shape} (dim_in)"
        got = X.shape[1] if table and X.ndim == 2 else f"shape {tuple(X.shape[1:])}"
        raise ValueError(f"The '{name}' parameter of Trainer must have {expected}. Got {got} (a batch of shape "
                         f"{tuple(X.shape)}) instead.")
