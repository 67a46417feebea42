"""Deep Ensembles (Lakshminarayanan et al., 2017), trained as independent members, on Ray."""

from ._version import __version__
from .data import TensorDataset
from .ensemble import DeepEnsemble, DeepEnsembleClassifier, combine
from .many import EnsemblePool, FitResult, fit_many, iter_fit_many
from .predictions import CategoricalPrediction, GaussianMixturePrediction, MemberPrediction
from .trainer import Trainer
from .training import MemberDivergedError, horizon_lr

__all__ = ["DeepEnsemble", "DeepEnsembleClassifier", "TensorDataset", "Trainer",
           "GaussianMixturePrediction", "CategoricalPrediction", "MemberPrediction",
           "MemberDivergedError", "horizon_lr", "combine", "fit_many", "iter_fit_many", "EnsemblePool", "FitResult", "__version__"]
