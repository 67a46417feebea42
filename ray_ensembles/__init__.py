"""Deep Ensembles (Lakshminarayanan et al., 2017), trained as independent members, on Ray."""

from ._version import __version__
from .data import TensorDataset
from .ensemble import DeepEnsemble, DeepEnsembleClassifier
from .predictions import CategoricalPrediction, GaussianMixturePrediction, MemberPrediction
from .trainer import Trainer
from .training import MemberDivergedError

__all__ = ["DeepEnsemble", "DeepEnsembleClassifier", "TensorDataset", "Trainer",
           "GaussianMixturePrediction", "CategoricalPrediction", "MemberPrediction",
           "MemberDivergedError", "__version__"]
