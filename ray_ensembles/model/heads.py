"""What makes an ensemble a regressor or a classifier: its head.

A head maps the members' raw outputs (M, B, outputs) to each member's training loss, to a
prediction, and to each member's log-likelihood of the true targets; it also checks targets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import conformal
from .metrics import mixture_gaussian_nll
from .predictions import CategoricalPrediction, GaussianMixturePrediction
from .validation import as_float_tensor, as_label_tensor, check_float, check_int

_LOG_2PI = math.log(2 * math.pi)
VARIANCE_FLOOR = 1e-6  # the paper's: variance = softplus(raw) + 1e-6


def fit_log_scale(size: int, nll) -> tuple[torch.Tensor, float, float]:
    """The log-scale (size,) that minimises `nll(log_scale)`, from 0 (no change): L-BFGS in
    float64; with the NLL at 0 and at the optimum."""
    log_scale = torch.zeros(size, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_scale], max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nll(log_scale)
        loss.backward()
        return loss

    with torch.no_grad():
        before = float(nll(log_scale))
    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        after = float(nll(log_scale))
    if not after <= before:  # never worse than no calibration
        return torch.zeros(size, dtype=torch.float64), before, before
    return log_scale.detach(), before, after


def positive_numbers(owner: str, name: str, value, size: int) -> list[float]:
    if not isinstance(value, list) or len(value) != size or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value):
        raise ValueError(f"The '{name}' of {owner}'s calibration must be {size} positive finite "
                         f"number{'s' * (size != 1)}. Got {value!r} instead.")
    return [float(v) for v in value]


def checked_calibration(owner: str, calibration, scale: str, check_scale, outputs: int | None) -> dict:
    """A calibration: its `scale` (`calibrate`'s, checked by `check_scale`), its conformal scores
    (`conformalize`'s), or both."""
    if not isinstance(calibration, dict) or not calibration or not set(calibration) <= {scale, "conformal_scores"}:
        raise ValueError(f"{owner}'s calibration must be a dict of {scale!r} (calibrate), 'conformal_scores' "
                         f"(conformalize) or both. Got {str(calibration)[:200]} instead.")
    checked = {scale: check_scale(calibration[scale])} if scale in calibration else {}
    if "conformal_scores" in calibration:
        checked["conformal_scores"] = conformal.check_scores(owner, calibration["conformal_scores"], outputs)
    return checked


def mean_and_variance(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian head's raw outputs (M, B, 2T) as means and variances, (M, B, T) each."""
    mean, raw = out.float().chunk(2, dim=-1)
    # softplus is far slower on the strided half than on a contiguous copy of it
    return mean, F.softplus(raw.contiguous()) + VARIANCE_FLOOR


class GaussianHead:
    """Each member predicts a mean and a variance per target dimension; the ensemble is their
    uniform mixture. `nll_beta` weights each row's NLL gradient by its variance ** beta."""

    task = "regression"
    prediction = GaussianMixturePrediction

    def __init__(self, owner: str, dim_out, nll_beta):
        self.owner = owner
        self.dim_out = check_int(owner, "dim_out", dim_out, minimum=1)
        self.nll_beta = check_float(owner, "nll_beta", nll_beta, minimum=0.0)
        if self.nll_beta > 1:
            raise ValueError(f"The 'nll_beta' parameter of {owner} must be in [0, 1]. Got {nll_beta} instead.")
        self.num_outputs = 2 * self.dim_out

    @property
    def config(self) -> dict:
        return {"dim_out": self.dim_out, "nll_beta": self.nll_beta}

    def loss(self, out: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Gaussian NLL per member, (M,): mean over rows of the sum over target dimensions."""
        mean, var = mean_and_variance(out)                       # (M, B, T) each
        nll = 0.5 * (_LOG_2PI + var.log() + (ys - mean).square() / var)
        if self.nll_beta:  # the gradient of the weighted NLL, the value of the NLL itself
            weighted = nll * var.detach() ** self.nll_beta
            nll = weighted + (nll - weighted).detach()
        return nll.sum(-1).mean(-1)

    def summarize(self, out, standardizer) -> tuple[torch.Tensor, ...]:
        """Member means and variances (M, B, T) in original units."""
        return standardizer.original_units(*mean_and_variance(out))

    def member_log_lik(self, pred, y) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's log-likelihood of each row (M, N), and its means (M, N, T)."""
        normal = torch.distributions.Normal(pred.member_mean, pred.member_variance.sqrt())
        return normal.log_prob(y).sum(-1), pred.member_mean

    def member_predictions(self, pred) -> list:
        return pred.members()

    def check_calibration(self, calibration: dict) -> dict:
        return checked_calibration(self.owner, calibration, "variance_scale", lambda scale: positive_numbers(
            self.owner, "variance_scale", scale, self.dim_out), self.dim_out)

    @staticmethod
    def _scaled(member_mean, member_variance, scale):
        """The mixture scaled about its mean so that its variance, aleatoric and epistemic parts
        alike, is `scale` (T,) times as large: member spreads by sqrt(scale), variances by scale."""
        center = member_mean[0] + (member_mean - member_mean[:1]).mean(0)
        return center + scale.sqrt() * (member_mean - center), member_variance * scale

    def calibrated(self, outputs, calibration: dict) -> tuple[torch.Tensor, ...]:
        if "variance_scale" not in calibration:
            return outputs
        member_mean, member_variance = outputs
        scale = torch.tensor(calibration["variance_scale"], dtype=member_variance.dtype, device=member_variance.device)
        return self._scaled(member_mean, member_variance, scale)

    def fit_calibration(self, pred, y) -> tuple[dict, float, float]:
        """The variance scale per output that maximises the mixture's likelihood of y."""
        mean, variance, y = pred.member_mean.double(), pred.member_variance.double(), y.double()
        log_scale, before, after = fit_log_scale(
            self.dim_out, lambda log_scale: mixture_gaussian_nll(*self._scaled(mean, variance, log_scale.exp()), y, "none").mean())
        return {"variance_scale": log_scale.exp().tolist()}, before, after

    def conformal_scores(self, pred, y) -> list:
        """Each output's sorted scores |y - mean| / stddev, as the manifest holds them."""
        return conformal.regression_scores(pred.mean.double(), pred.stddev.double(), y.double()).tolist()

    def check_y(self, y, rows: int) -> torch.Tensor:
        y = as_float_tensor(self.owner, "y", y, ndim=(1, 2, 3))
        if y.ndim == 1:
            y = y.unsqueeze(-1)
        if y.shape[-2] != rows or y.shape[-1] != self.dim_out:
            raise ValueError(f"The 'y' parameter of {self.owner} must be ({rows}, {self.dim_out}) to match "
                             f"X and dim_out. Got shape {tuple(y.shape)} instead.")
        return y


class CategoricalHead:
    """Each member predicts softmax probabilities over `num_classes`, trained with cross-entropy;
    the ensemble averages them."""

    task = "classification"
    prediction = CategoricalPrediction
    dim_out = None  # no target statistics

    def __init__(self, owner: str, num_classes):
        self.owner = owner
        self.num_classes = self.num_outputs = check_int(owner, "num_classes", num_classes, minimum=2)

    @property
    def config(self) -> dict:
        return {"num_classes": self.num_classes}

    def loss(self, out: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per member, (M,)."""
        logits = out.float()                                     # (M, B, C)
        ys = ys.expand(logits.shape[:2])
        return F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="none").view(ys.shape).mean(-1)

    def summarize(self, out, standardizer) -> tuple[torch.Tensor, ...]:
        return (out.float().softmax(-1),)                        # (M, B, C)

    def member_log_lik(self, pred, y) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's log-probability of the true label (M, N), and its probabilities (M, N, C)."""
        probs = pred.member_probs
        return probs.gather(-1, y.expand(probs.shape[:2]).unsqueeze(-1)).squeeze(-1).clamp_min(1e-12).log(), probs

    def member_predictions(self, pred) -> list:
        return [CategoricalPrediction(p.unsqueeze(0)) for p in pred.member_probs]

    def check_calibration(self, calibration: dict) -> dict:
        return checked_calibration(self.owner, calibration, "temperature", lambda t: positive_numbers(
            self.owner, "temperature", [t], 1)[0], None)

    @staticmethod
    def _logits(member_probs):
        """Each member's logits, as log-probabilities; one that underflowed to 0 keeps a finite
        logit (the dtype's smallest normal), and so a finite gradient."""
        return member_probs.clamp_min(torch.finfo(member_probs.dtype).tiny).log()

    def calibrated(self, outputs, calibration: dict) -> tuple[torch.Tensor, ...]:
        if "temperature" not in calibration:
            return outputs
        return ((self._logits(outputs[0]) / calibration["temperature"]).softmax(-1),)

    def conformal_scores(self, pred, y) -> list:
        """The sorted APS scores of the labels y."""
        return conformal.classification_scores(pred.probs.double(), y).tolist()

    def fit_calibration(self, pred, y) -> tuple[dict, float, float]:
        """The temperature of every member's softmax that maximises the averaged softmax's
        likelihood of the labels y, computed in log space: a capped log would let a confidently
        wrong row stop counting, and reward sharpening."""
        logits, members = self._logits(pred.member_probs).double(), pred.member_probs.shape[0]

        def nll(log_t):
            log_mixture = torch.logsumexp((logits / log_t.exp()).log_softmax(-1), 0) - math.log(members)
            return -log_mixture.gather(-1, y.long().unsqueeze(-1)).mean()

        log_t, before, after = fit_log_scale(1, nll)
        return {"temperature": float(log_t.exp())}, before, after

    def check_y(self, y, rows: int) -> torch.Tensor:
        y = as_label_tensor(self.owner, "y", y, num_classes=self.num_classes)
        if y.shape[-1] != rows:
            raise ValueError(f"The 'y' parameter of {self.owner} must have {rows} labels to "
                             f"match X. Got shape {tuple(y.shape)} instead.")
        return y
