"""Split-conformal prediction on top of the ensemble (Vovk et al.; Lei et al. 2018; Romano et al.
2020): scores of held-out rows the members never trained on, then, for a new row, the set of
outputs whose score is within the scores' ceil((n + 1) * coverage)-th smallest. On rows
exchangeable with the held-out ones it covers the truth with probability at least `coverage`,
whatever the members learned.

- Regression: the score is |y - mean| / stddev of the ensemble's own mixture (per output), so
  the interval mean +- q * stddev keeps the ensemble's shape (wide where members disagree or
  predict noise) and only its scale is set by the held-out rows. With continuous scores the
  coverage is also below coverage + 1 / (n + 1).
- Classification, adaptive prediction sets (APS): the score is the total probability of the
  classes at least as probable as the true one; the set holds the classes from the most probable
  on until their total reaches q (the last one included, so a set is never empty, which can only
  add coverage).
"""

from __future__ import annotations

import math

import torch

from .validation import check_float


def quantile(scores: torch.Tensor, coverage: float) -> torch.Tensor:
    """The ceil((n + 1) * coverage)-th smallest of n sorted scores along the last dimension; inf
    where that exceeds n (too few held-out rows for `coverage`: the whole output space)."""
    coverage = check_float("conformal", "coverage", coverage, strict_minimum=0.0, below=1.0)
    n = scores.shape[-1]
    k = math.ceil((n + 1) * coverage - 1e-9)  # a product such as 25 * 0.92 lands just above 23
    if k > n:
        return torch.full(scores.shape[:-1], math.inf, dtype=scores.dtype, device=scores.device)
    return scores[..., k - 1]


def regression_scores(mean: torch.Tensor, stddev: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sorted scores |y - mean| / stddev of n rows (n, T), as (T, n)."""
    return ((y - mean).abs() / stddev).T.sort(-1).values


def interval(mean: torch.Tensor, stddev: torch.Tensor, scores: torch.Tensor, coverage: float):
    """(lower, upper) (B, T): mean -+ q * stddev, q the conformal quantile of each output's scores."""
    half = quantile(scores, coverage).to(stddev) * stddev
    return mean - half, mean + half


def _ranked(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classes from the most probable on (B, C), and the total probability up to each."""
    ranked, order = probs.sort(-1, descending=True)
    return order, ranked.cumsum(-1)


def classification_scores(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sorted APS scores of n rows: the total probability of the classes ranked up to the true one."""
    order, total = _ranked(probs)
    rank = (order == y.long().unsqueeze(-1)).int().argmax(-1, keepdim=True)
    return total.gather(-1, rank).squeeze(-1).sort().values


def prediction_set(probs: torch.Tensor, scores: torch.Tensor, coverage: float) -> torch.Tensor:
    """Which classes (B, C) bool the set holds: from the most probable on, each class whose
    predecessors' total is below q."""
    q = quantile(scores, coverage).item()
    order, total = _ranked(probs)
    included = (total - probs.gather(-1, order)) < q
    return torch.zeros_like(included).scatter(-1, order, included)


def check_scores(owner: str, value, outputs: int | None) -> list:
    """Saved scores: for a regressor `outputs` lists of finite non-negative numbers of one length,
    for a classifier (outputs None) one list; returned sorted."""
    lists = value if outputs is not None else [value]
    if not isinstance(lists, list) or len(lists) != (outputs or 1) or not all(
            isinstance(s, list) and s and len(s) == len(lists[0]) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in s)
            for s in lists):
        size = f"{outputs} lists" if outputs is not None else "one list"
        raise ValueError(f"The 'conformal_scores' of {owner}'s calibration must be {size} of the same positive "
                         f"number of finite scores >= 0. Got {str(value)[:200]} instead.")
    lists = [sorted(float(v) for v in s) for s in lists]
    return lists if outputs is not None else lists[0]
