"""Choosing members from trained ones. Greedy ensemble selection (Caruana, Niculescu-Mizil, Crew &
Ksikes, ICML 2004), the selection step of hyper-deep ensembles (Wenzel, Snoek, Tran & Jenatton,
NeurIPS 2020): from many trained candidate members, pick the ones whose uniform mixture has the
lowest validation NLL. And `m_curve`: members are i.i.d., so the NLL for every M comes from one
trained ensemble by scoring random member subsets."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import torch

from .metrics import ensemble_validation_metrics
from .validation import check_int


def mixture_nll(member_log_lik: torch.Tensor, chosen: list[int]) -> float:
    """Validation NLL (nats per row) of the uniform mixture of the `chosen` rows of
    member_log_lik (K, N), each member's log-likelihood of each validation row; a member chosen
    twice counts twice."""
    log_lik = torch.as_tensor(member_log_lik, dtype=torch.float64)[list(chosen)]
    return -(torch.logsumexp(log_lik, 0) - math.log(len(chosen))).mean().item()


def greedy_selection(member_log_lik, size: int, *, replacement: bool = True) -> list[int]:
    """The indices of `size` candidates, in the order chosen: each step adds the candidate that
    lowers the mixture's validation NLL most. With `replacement` (Caruana's, and the paper's
    default) a candidate may be chosen again, which weights it more; without, at most once."""
    log_lik = torch.as_tensor(member_log_lik, dtype=torch.float64)
    if log_lik.ndim != 2 or log_lik.shape[0] < 1 or log_lik.shape[1] < 1:
        raise ValueError("The 'member_log_lik' parameter of greedy_selection must be (candidates, rows), "
                         f"both at least 1. Got shape {tuple(log_lik.shape)} instead.")
    if not torch.isfinite(log_lik).all():
        raise ValueError("The 'member_log_lik' parameter of greedy_selection must be finite: a candidate "
                         "that diverged cannot be scored.")
    size = check_int("greedy_selection", "size", size, minimum=1)
    if not replacement and size > log_lik.shape[0]:
        raise ValueError(f"The 'size' parameter of greedy_selection must be at most the {log_lik.shape[0]} "
                         f"candidates without replacement. Got {size} instead.")
    chosen: list[int] = []
    running = torch.full(log_lik.shape[1:], -math.inf, dtype=torch.float64)  # log of the chosen densities' sum
    for step in range(size):
        totals = torch.logaddexp(running, log_lik)                            # (K, N): with each candidate
        nll = -(totals.mean(1) - math.log(step + 1))
        if not replacement:
            nll[chosen] = math.inf
        best = int(nll.argmin())
        chosen.append(best)
        running = totals[best]
    return chosen


def m_curve(ensemble, X, y, *, num_subsets: int = 20, seed: int = 0) -> list[dict]:
    """Validation metrics for every ensemble size 1..M from ONE trained ensemble of M members.

    Members are i.i.d., so an ensemble of k members is a random k-subset of them. For each k, up to
    `num_subsets` distinct subsets (all of them when there are fewer) are scored; each row has the
    mean and standard deviation over subsets of the ensemble NLL (and RMSE or accuracy).
    """

    num_subsets = check_int("m_curve", "num_subsets", num_subsets, minimum=1)
    seed = check_int("m_curve", "seed", seed, minimum=0)
    log_lik, points = ensemble.evaluate_members(X, y)
    y = ensemble.check_y(y, len(X)).cpu()
    ids = ensemble.member_ids
    rng = random.Random(seed)
    rows = []
    for k in range(1, len(ids) + 1):
        if math.comb(len(ids), k) <= num_subsets:
            subsets = list(itertools.combinations(range(len(ids)), k))
        else:  # distinct subsets, drawn until there are enough (there are more than num_subsets)
            drawn = set()
            while len(drawn) < num_subsets:
                drawn.add(tuple(sorted(rng.sample(range(len(ids)), k))))
            subsets = sorted(drawn)
        scores = [ensemble_validation_metrics(ensemble.task, [ids[i] for i in s], log_lik[list(s)],
                                              points[list(s)], y) for s in subsets]
        row = {"num_members": k, "num_subsets": len(subsets)}
        for metric in ("val_nll", "val_rmse", "val_accuracy"):
            if metric in scores[0]:
                values = [s[metric] for s in scores]
                row[f"{metric}_mean"] = statistics.fmean(values)
                row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows
