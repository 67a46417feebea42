"""Evaluation metrics as pure functions on tensors.

Shapes: B rows, D target dimensions, C classes, M members. Scalar metrics return a Python float;
`reduction="none"` returns the per-row values. NLLs include the 0.5 * log(2 * pi) constant and
are summed over target dimensions, averaged over rows.
"""

from __future__ import annotations

import math

import torch

_LOG_2PI = math.log(2 * math.pi)
_EPS = 1e-12


def _reduce(per_row: torch.Tensor, reduction: str):
    if reduction == "none":
        return per_row
    if reduction == "mean":
        return per_row.double().mean().item()
    raise ValueError(f"The 'reduction' parameter must be 'mean' or 'none'. Got {reduction!r} instead.")


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(-1) if t.ndim == 1 else t


# Regression -----------------------------------------------------------------------------------

def gaussian_nll(mean, variance, y, reduction: str = "mean"):
    """NLL of y under N(mean, variance); all (B, D) (or (B,)). Per row: (B,)."""
    mean, variance, y = _as_2d(mean), _as_2d(variance), _as_2d(y)
    per_dim = 0.5 * (_LOG_2PI + variance.log() + (y - mean).square() / variance)
    return _reduce(per_dim.sum(-1), reduction)


def mixture_gaussian_nll(member_mean, member_variance, y, reduction: str = "mean"):
    """Exact NLL of y under the uniform mixture of M Gaussians: (M, B, D) means and variances.

    -log(1/M sum_m N(y; mu_m, var_m)) by logsumexp over members, so it stays finite where a
    moment-matched Gaussian would be used only as an approximation. Per row: (B,).
    """
    y = _as_2d(y)
    if member_mean.ndim == 2:
        member_mean, member_variance = member_mean.unsqueeze(-1), member_variance.unsqueeze(-1)
    member_log_density = -0.5 * (_LOG_2PI + member_variance.log()
                                 + (y - member_mean).square() / member_variance).sum(-1)  # (M, B)
    log_density = torch.logsumexp(member_log_density, dim=0) - math.log(member_mean.shape[0])
    return _reduce(-log_density, reduction)


def rmse(mean, y) -> float:
    return (_as_2d(mean) - _as_2d(y)).double().square().mean().sqrt().item()


def crps_gaussian(mean, variance, y, reduction: str = "mean"):
    """Continuous ranked probability score of N(mean, variance), closed form; summed over D."""
    mean, variance, y = _as_2d(mean), _as_2d(variance), _as_2d(y)
    sigma = variance.sqrt()
    z = (y - mean) / sigma
    # elementwise, without torch.distributions' argument checks: a degenerate row (zero
    # variance) is NaN on its own, as in properscoring, and the others keep their scores
    pdf = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
    per_dim = sigma * (z * (2 * torch.special.ndtr(z) - 1) + 2 * pdf - 1 / math.sqrt(math.pi))
    return _reduce(per_dim.sum(-1), reduction)


def calibration_curve(mean, variance, y, num_levels: int = 99):
    """Observed coverage of the Gaussian's central intervals at evenly spaced expected levels.

    Returns (expected, observed), each (num_levels,): for level p, the fraction of all B x D values
    of y inside the central p-interval of N(mean, variance).
    """
    mean, variance, y = _as_2d(mean), _as_2d(variance), _as_2d(y)
    expected = torch.linspace(0, 1, num_levels + 2, dtype=torch.float64)[1:-1]
    z = ((y - mean).abs() / variance.sqrt()).double().flatten()                 # (B*D,)
    # |y - mean| / sigma <= z_p, with z_p the (1 + p) / 2 quantile of the standard normal
    z_p = math.sqrt(2.0) * torch.erfinv(expected)                                # (L,)
    observed = (z.unsqueeze(0) <= z_p.unsqueeze(1)).double().mean(1)
    return expected, observed


def miscalibration_area(mean, variance, y, num_levels: int = 99) -> float:
    """The area between the calibration curve and the diagonal on [0, 1]: the trapezoidal
    integral of |observed - expected| over the `num_levels` levels and the ends 0 and 1, where
    both coverages agree. (The mean gap over the levels alone is L / (L + 1) of the way larger.)"""
    expected, observed = calibration_curve(mean, variance, y, num_levels)
    return ((observed - expected).abs().sum() / (num_levels + 1)).item()


# Classification -------------------------------------------------------------------------------

def classification_nll(probs, labels, reduction: str = "mean"):
    """-log p(label): probs (B, C), labels (B,) int. Per row: (B,)."""
    picked = probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return _reduce(-picked.clamp_min(_EPS).log(), reduction)


def accuracy(probs, labels) -> float:
    return (probs.argmax(-1) == labels).double().mean().item()


def brier_score(probs, labels) -> float:
    """The paper's form: (1/C) sum_c (onehot_c - p_c)^2, averaged over rows."""
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[-1]).to(probs.dtype)
    return (onehot - probs).double().square().mean().item()


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
    """Sum over equal-width confidence bins of (bin weight) * |accuracy - mean confidence|."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    bins = torch.clamp((confidence.double() * num_bins).long(), max=num_bins - 1)
    total = torch.zeros(num_bins, dtype=torch.float64)
    gap = total.index_add(0, bins, correct) - total.index_add(0, bins, confidence.double())
    return (gap.abs().sum() / len(labels)).item()


# Uncertainty ----------------------------------------------------------------------------------

def entropy(probs):
    """Entropy in nats over the last (class) dimension: (..., C) -> (...)."""
    return -(probs * probs.clamp_min(_EPS).log()).sum(-1)


def mutual_information(member_probs):
    """Entropy of the mean minus mean member entropy: (M, B, C) -> (B,). Never negative."""
    return (entropy(member_probs.mean(0)) - entropy(member_probs).mean(0)).clamp_min(0)


def auroc(score_in, score_out) -> float:
    """Probability that an out-of-distribution row scores higher than an in-distribution one
    (ties count one half): the area under the ROC curve of `score` as an OOD detector."""
    scores = torch.cat([score_in.flatten(), score_out.flatten()]).double()
    # average ranks handle ties exactly (Mann-Whitney U)
    order = scores.argsort()
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True,
                                                  return_counts=True)
    first_rank = torch.cumsum(counts, 0) - counts + 1
    ranks = torch.empty_like(scores)
    ranks[order] = (first_rank + (counts - 1) / 2.0).double()[inverse]
    n_in, n_out = score_in.numel(), score_out.numel()
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
    return (u / (n_in * n_out)).item()


# Ensembles ------------------------------------------------------------------------------------

def ensemble_validation_metrics(task: str, member_ids, member_log_lik, member_points, y) -> dict:
    """Per-member and ensemble metrics from every member's validation outputs.

    member_log_lik (M, N): each member's log-likelihood of each row. member_points: (M, N, T)
    means for regression, (M, N, C) probabilities for classification. The ensemble NLL is the
    exact mixture's: -mean_n log(1/M sum_m p_m(y_n)).
    """
    log_lik = torch.as_tensor(member_log_lik, dtype=torch.float64)
    points = torch.as_tensor(member_points, dtype=torch.float64)
    y = torch.as_tensor(y)
    ensemble_ll = torch.logsumexp(log_lik, 0) - math.log(log_lik.shape[0])
    out = {"val_nll": -ensemble_ll.mean().item(),
           "member_val_nll": {int(m): -log_lik[i].mean().item() for i, m in enumerate(member_ids)}}
    if task == "regression":
        out["val_rmse"] = rmse(points.mean(0), y.double())
    else:
        out["val_accuracy"] = accuracy(points.mean(0), y)
    return out


def validation_metrics(task: str, validation, evaluate, member_ids) -> dict:
    """`ensemble_validation_metrics` of the members that `evaluate(X, y)` scores (ids
    `member_ids`) on the `validation` dataset's rows; {} without validation rows."""
    if validation is None:
        return {}
    log_lik, points = evaluate(validation.X, validation.y)
    return ensemble_validation_metrics(task, member_ids, log_lik, points, validation.y)


def run_metrics(ensemble, validation, train_losses: dict[int, float]) -> dict:
    """A trained ensemble's `Trainer.metrics`: {"members": {id: {"train_loss", "val_nll"}}, and
    with validation rows the ensemble's "val_nll" and "val_rmse" or "val_accuracy"}."""
    members = {m: {"train_loss": loss} for m, loss in train_losses.items()}
    scores = validation_metrics(ensemble.task, validation, ensemble.evaluate_members, ensemble.member_ids)
    for m, nll in scores.pop("member_val_nll", {}).items():
        members[m]["val_nll"] = nll
    return {"members": members, **scores}


def check_predictions(ensemble, rows, saved_at):
    """An ensemble that trained but cannot predict finite values in the target's units (a target
    of extreme scale) fails here, where the run is still at hand, not at its first use."""
    if rows is None:
        return
    try:
        ensemble.predict(rows.X[:256]).variance  # the mixture's sum can overflow alone
    except FloatingPointError as err:
        raise FloatingPointError(f"The ensemble trained, but cannot predict: {err} Its members are "
                                 f"saved at {saved_at}.") from None
