"""The Trainer's data as a user gives it (a TensorDataset, a torch one, or a Ray Dataset with its
column names), checked against the ensemble and turned into the loop's `TrainingData`."""

from __future__ import annotations

import torch.utils.data

from .loop.data import TensorDataset, TrainingData
from .model.ensemble import Ensemble
from .model.validation import check_type
from .on_ray.streaming import TableStream, is_ray_dataset


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
        if len(stream.features) != ensemble.dim_in:
            raise ValueError(f"The 'features' parameter of Trainer must name dim_in={ensemble.dim_in} columns. "
                             f"Got {len(stream.features)} ({stream.features}) instead.")
        return stream, validation_dataset
    if target is not None or features is not None:
        raise ValueError("The 'target' and 'features' parameters of Trainer name the columns of a Ray Dataset. "
                         f"Got them with a {type(dataset).__name__} instead.")
    if dataset is None:
        raise TypeError("The 'dataset' parameter of Trainer must be a TensorDataset or a Ray Dataset. Got NoneType instead.")
    return check_tensor_dataset(ensemble, "dataset", dataset), validation_dataset


def check_tensor_dataset(ensemble, name: str, data) -> TensorDataset | None:
    if isinstance(data, torch.utils.data.TensorDataset):
        data = TensorDataset.from_torch(data)
    if data is not None:
        if not isinstance(data, TensorDataset):
            check_type("Trainer", name, data, TensorDataset,
                       "a TensorDataset or a Ray Dataset" if name == "dataset" else "a TensorDataset")
        if data.X.shape[1] != ensemble.dim_in:
            raise ValueError(f"The '{name}' parameter of Trainer must have dim_in={ensemble.dim_in} "
                             f"input columns. Got {data.X.shape[1]} instead.")
        ensemble.check_y(data.y, len(data))
    return data
