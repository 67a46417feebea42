"""Sweep input checks and the M curve, without Ray."""

import itertools

import pytest
import torch

from ray_ensembles import DeepEnsemble, TensorDataset, Trainer
from ray_ensembles.model.metrics import ensemble_validation_metrics
from ray_ensembles.sweep import m_curve, normalize_param_space, tune_ensemble

pytestmark = pytest.mark.unit

G = torch.Generator().manual_seed(0)
X = torch.randn(200, 3, generator=G)
Y = X[:, :1] * X[:, 1:2] + 0.1 * torch.randn(200, 1, generator=G)


@pytest.mark.parametrize("space, message", [
    ({}, "non-empty dict"),
    ({"num_members": []}, "'num_members' grid .* is empty"),
    ({"num_members": [1, 0]}, "'num_members' values .* >= 1. Got 0"),
    ({"adversarial_eps": [0.0, -0.01]}, "'adversarial_eps' values .* >= 0. Got -0.01"),
    ({"learning_rate": [0.1]}, "unknown option 'learning_rate'"),
])
def test_bad_grids_fail_before_ray_starts(space, message, ray_must_not_start):
    with pytest.raises(ValueError, match=message):
        tune_ensemble(TensorDataset(X, Y), space)


@pytest.mark.parametrize("options, message", [
    ({"trial_training": "threads"}, "'trial_training' .* Got 'threads'"),
    ({"max_workers_per_trial": 0}, "'max_workers_per_trial' .* Got 0"),
])
def test_bad_trial_options_fail_before_ray_starts(options, message, ray_must_not_start):
    with pytest.raises(ValueError, match=message):
        tune_ensemble(TensorDataset(X, Y), {"num_members": [1]}, **options)


def test_tune_search_spaces_pass_through():
    from ray import tune
    space = normalize_param_space({"lr": tune.loguniform(1e-4, 1e-2), "num_members": tune.choice([1, 3])})
    assert set(space) == {"train_lr", "num_members"}


def test_the_m_curve_scores_member_subsets_of_one_ensemble(tmp_path):
    e = DeepEnsemble(dim_in=3, num_members=4, hidden_dim=16, seed=1)
    Trainer(e, TensorDataset(X[:150], Y[:150]), train_num_epochs=5, train_batch_size=50,
            train_lr=1e-2, results_folder=tmp_path).train()
    rows = m_curve(e, X[150:], Y[150:], num_subsets=20)
    assert [r["num_members"] for r in rows] == [1, 2, 3, 4]
    assert [r["num_subsets"] for r in rows] == [4, 6, 4, 1]  # every subset, as there are <= 20
    log_lik, points = e.evaluate_members(X[150:], Y[150:])
    full = ensemble_validation_metrics("regression", e.member_ids, log_lik, points, Y[150:])
    assert rows[-1]["val_nll_mean"] == pytest.approx(full["val_nll"]) and rows[-1]["val_nll_std"] == 0
    singles = [-log_lik[i].double().mean().item() for i in range(4)]
    assert rows[0]["val_nll_mean"] == pytest.approx(sum(singles) / 4)
    pairs = [ensemble_validation_metrics("regression", [e.member_ids[i] for i in pair], log_lik[list(pair)],
                                         points[list(pair)], Y[150:])["val_nll"]
             for pair in itertools.combinations(range(4), 2)]
    assert rows[1]["val_nll_mean"] == pytest.approx(sum(pairs) / 6)  # M = 2: the mean over all 6 pairs
