"""Greedy ensemble selection (ray_ensembles.model.selection), on synthetic candidates and on trained
members of different configurations."""

import random

import pytest
import torch

from ray_ensembles import DeepEnsemble, TensorDataset, Trainer
from ray_ensembles.model.selection import greedy_selection, mixture_nll


def gaussian_log_lik(mean, std, y):
    return torch.distributions.Normal(mean, std).log_prob(y)


@pytest.mark.unit
def test_greedy_selection_prefers_good_and_complementary_candidates():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(500, generator=g)
    # candidates: 4 good (unbiased, right width), 4 too narrow, 2 biased left and 2 biased right with
    # the right width, which are poor alone and good together
    specs = [(0.0, 1.0)] * 4 + [(0.0, 0.3)] * 4 + [(-1.0, 1.0)] * 2 + [(1.0, 1.0)] * 2
    log_lik = torch.stack([gaussian_log_lik(bias + 0.05 * torch.randn(500, generator=g), std, y) for bias, std in specs])
    chosen = greedy_selection(log_lik, 5)
    assert not set(chosen) & {4, 5, 6, 7}  # never a too-narrow one
    greedy = mixture_nll(log_lik, chosen)
    rng = random.Random(0)
    randoms = sorted(mixture_nll(log_lik, rng.sample(range(12), 5)) for _ in range(200))
    assert greedy < randoms[0]  # better than every one of 200 random ensembles of the same size

    without = greedy_selection(log_lik, 12, replacement=False)
    assert sorted(without) == list(range(12))  # each once
    again = greedy_selection(log_lik, 30)  # with replacement more picks than candidates
    assert len(again) == 30 and mixture_nll(log_lik, again) <= mixture_nll(log_lik, again[:5]) + 1e-9


@pytest.mark.unit
def test_selection_from_trained_members_of_several_configurations_beats_random(tmp_path):
    g = torch.Generator().manual_seed(1)
    X = torch.rand(600, 2, generator=g) * 6 - 3
    y = (X[:, :1] * 2).sin() + 0.2 * X[:, 1:] ** 2 + 0.1 * torch.randn(600, 1, generator=g)
    fit, val = slice(0, 400), slice(400, 600)
    candidates = []
    for k, (hidden, lr, steps) in enumerate([(4, 1e-3, 30), (32, 1e-2, 400), (8, 3e-2, 200), (64, 3e-3, 100)]):
        ensemble = DeepEnsemble(2, 1, num_members=3, hidden_dim=hidden, seed=k)
        Trainer(ensemble, TensorDataset(X[fit], y[fit]), results_folder=tmp_path / str(k),
                train_num_steps=steps, train_lr=lr).train()
        candidates.append(ensemble.evaluate_members(X[val], y[val])[0])  # (3, rows) each
    log_lik = torch.cat(candidates)                                        # 12 candidates
    chosen = greedy_selection(log_lik, 4)
    rng = random.Random(0)
    random_nll = [mixture_nll(log_lik, rng.sample(range(12), 4)) for _ in range(100)]
    assert mixture_nll(log_lik, chosen) < min(random_nll)


@pytest.mark.unit
@pytest.mark.parametrize("log_lik, size, kwargs, message", [
    (torch.zeros(0, 3), 1, {}, "must be \\(candidates, rows\\)"),
    (torch.zeros(3), 1, {}, "must be \\(candidates, rows\\)"),
    (torch.tensor([[0.0, -float("inf")]]), 1, {}, "must be finite"),
    (torch.zeros(3, 4), 0, {}, "'size' parameter of greedy_selection must be an int >= 1. Got 0"),
    (torch.zeros(3, 4), 4, {"replacement": False}, "at most the 3 candidates without replacement. Got 4"),
])
def test_greedy_selection_refuses_bad_input(log_lik, size, kwargs, message):
    with pytest.raises(ValueError, match=message):
        greedy_selection(log_lik, size, **kwargs)
