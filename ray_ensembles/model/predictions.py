"""What an ensemble predicts: a uniform mixture of member Gaussians, or averaged softmax."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from . import conformal, metrics
from .validation import as_float_tensor, check_float


@dataclass(frozen=True)
class MemberPrediction:
    """One member's Gaussian, in the target's original units: mean and log variance, (B, D)."""

    mean: torch.Tensor
    log_var: torch.Tensor

    @cached_property
    def variance(self):
        return self.log_var.exp()


@dataclass(frozen=True)
class GaussianMixturePrediction:
    """Uniform mixture of M Gaussians, in the target's original units. Summaries are computed once,
    when first read.

    `member_mean` and `member_variance` are (M, B, D). The summaries are (B, D):
    variance = aleatoric (mean of member variances) + epistemic (variance of member means), which
    is the mixture's exact variance computed without the cancellation of E[x^2] - E[x]^2.
    """

    member_mean: torch.Tensor
    member_variance: torch.Tensor
    conformal_scores: torch.Tensor | None = None  # (T, n) sorted, of an ensemble's `conformalize`
    probs = None  # a classifier's; None here, as in deep-ensembles-pytorch

    @cached_property
    def _offsets(self):
        # Member means relative to member 0's: differences of nearby floats are exact, so the
        # spread keeps full precision even when |mean| is large (targets near 1e4 in float32).
        return self.member_mean - self.member_mean[:1]

    @cached_property
    def mean(self):
        return self.member_mean[0] + self._offsets.mean(0)

    @cached_property
    def aleatoric(self):
        return self.member_variance.mean(0)

    @cached_property
    def epistemic(self):
        offsets = self._offsets
        return (offsets - offsets.mean(0)).square().mean(0)

    @cached_property
    def variance(self):
        variance = self.aleatoric + self.epistemic
        if not torch.isfinite(variance).all():  # finite parts, but their sum overflowed
            raise FloatingPointError(f"The mixture's variance overflows {variance.dtype}; predict from "
                                     "an ensemble trained on a float64 target.")
        return variance

    @cached_property
    def stddev(self):
        return self.variance.sqrt()

    def rows(self, index: slice) -> GaussianMixturePrediction:
        """The prediction for some of the rows: one request's share of a batched pass."""
        return GaussianMixturePrediction(self.member_mean[:, index], self.member_variance[:, index], self.conformal_scores)

    def members(self) -> list[MemberPrediction]:
        return [MemberPrediction(m, v.log()) for m, v in zip(self.member_mean, self.member_variance)]

    def log_prob(self, y) -> torch.Tensor:
        """Exact mixture log-density of y, (B, D) (or (B,) when D = 1), summed over D: (B,)."""
        y = as_float_tensor("log_prob", "y", y, ndim=(1, 2)).to(self.member_mean)
        rows, dims = self.member_mean.shape[1:]
        if y.ndim == 1 and dims == 1:
            y = y.unsqueeze(-1)
        if tuple(y.shape) != (rows, dims):
            raise ValueError(f"The 'y' parameter of log_prob must be ({rows}, {dims}), one target per "
                             f"predicted row. Got shape {tuple(y.shape)} instead.")
        return -metrics.mixture_gaussian_nll(self.member_mean, self.member_variance, y,
                                             reduction="none")

    def interval(self, coverage: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Central interval of the moment-matched Gaussian N(mean, variance) at `coverage`.

        The moment-matched Gaussian is used (not the mixture's own quantiles): it is what the paper
        reports and is exact for M = 1.
        """
        coverage = check_float("interval", "coverage", coverage, strict_minimum=0.0, below=1.0)
        z = math.sqrt(2.0) * torch.erfinv(torch.tensor(coverage, dtype=torch.float64)).item()
        half = z * self.stddev
        return self.mean - half, self.mean + half

    def conformal_interval(self, coverage: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The split-conformal interval at `coverage`, (B, T) each: mean -+ q * stddev, q fitted on
        held-out rows (`Ensemble.conformalize`, `conformal`); infinite where they are too few."""
        return conformal.interval(self.mean, self.stddev, fitted_scores(self.conformal_scores, "conformal_interval"),
                                  coverage)


@dataclass(frozen=True)
class CategoricalPrediction:
    """Average of M members' softmax. `member_probs` is (M, B, C)."""

    member_probs: torch.Tensor
    conformal_scores: torch.Tensor | None = None  # (n,) sorted, of an ensemble's `conformalize`
    mean = None  # a regressor's; None here, as in deep-ensembles-pytorch

    def rows(self, index: slice) -> CategoricalPrediction:
        """The prediction for some of the rows: one request's share of a batched pass."""
        return CategoricalPrediction(self.member_probs[:, index], self.conformal_scores)

    def prediction_set(self, coverage: float) -> torch.Tensor:
        """The adaptive prediction set at `coverage` (B, C) bool: the classes from the most probable
        on until their total reaches a level fitted on held-out rows (`Ensemble.conformalize`)."""
        return conformal.prediction_set(self.probs, fitted_scores(self.conformal_scores, "prediction_set"), coverage)

    @cached_property
    def probs(self):
        return self.member_probs.mean(0)

    @cached_property
    def entropy(self):
        """Predictive entropy, (B, 1): total uncertainty."""
        return metrics.entropy(self.probs).unsqueeze(-1)

    @cached_property
    def variance(self):
        """The predictive entropy, (B, 1), under the name the deep-ensembles-pytorch API uses."""
        return self.entropy

    @cached_property
    def aleatoric(self):
        """Expected member entropy, (B, 1)."""
        return metrics.entropy(self.member_probs).mean(0).unsqueeze(-1)

    @property
    def mutual_information(self):
        """Entropy minus expected member entropy, (B, 1): the epistemic part."""
        return metrics.mutual_information(self.member_probs).unsqueeze(-1)


def fitted_scores(scores: torch.Tensor | None, method: str) -> torch.Tensor:
    if scores is None:
        raise ValueError(f"{method} needs conformal scores: fit them with ensemble.conformalize(X, y) on "
                         "held-out rows the members never trained on.")
    return scores
