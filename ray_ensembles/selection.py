"""Greedy ensemble selection (Caruana, Niculescu-Mizil, Crew & Ksikes, ICML 2004), the selection step
of hyper-deep ensembles (Wenzel, Snoek, Tran & Jenatton, NeurIPS 2020): from many trained
candidate members, pick the ones whose uniform mixture has the lowest validation NLL."""

from __future__ import annotations

import math

import torch

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
