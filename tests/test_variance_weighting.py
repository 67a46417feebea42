"""The Gaussian NLL's variance weighting (beta-NLL) and the step size it makes safe (README,
"Learning rate"): the mechanism that made Adam at the paper's 0.1 fail, and its cure."""

import pytest
import torch

from ray_ensembles import DeepEnsemble, TensorDataset
from ray_ensembles.model.heads import VARIANCE_FLOOR, mean_and_variance
from ray_ensembles.loop.training import EnsembleFit, TrainSettings

pytestmark = pytest.mark.unit


def skewed_problem(rows=500, seed=0):
    """Like Boston's crime rate: skewed inputs put a few rows far from the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 13, generator=g).mul(1.5).exp()
    return x, torch.log1p(x[:, :3]).sum(1, keepdim=True) + 0.3 * torch.randn(rows, 1, generator=g)


def worst_after_warm_start(nll_beta, seed, steps=200, settle=50):
    """The paper's settings (1 x 50 ReLU, batch 100, Adam 0.1, M = 5) for `steps` steps: the
    largest RMSE of a member's mean (1.0 = predicting the target's mean) and the largest and
    smallest variance of any training row, in standardised units, from step `settle` on."""
    x, y = skewed_problem(seed=seed)
    e = DeepEnsemble(13, 1, num_members=5, hidden_dim=50, seed=seed, nll_beta=nll_beta)
    e.fit_normalization(x, y)
    fit = EnsembleFit(e, TensorDataset(x, y), TrainSettings(batch_size=100, lr=0.1, num_steps=steps), "cpu")
    rmse, high, low = 0.0, 0.0, float("inf")
    while fit.step < steps:
        fit.train_step()
        if fit.step >= settle:
            with torch.no_grad():
                mean, var = mean_and_variance(e.members(fit.batches.xs.expand(5, -1, -1)))
            assert torch.isfinite(mean).all() and torch.isfinite(var).all()
            rmse = max(rmse, float((mean - fit.batches.ys).square().mean((1, 2)).sqrt().max()))
            high, low = max(high, float(var.max())), min(low, float(var.min()))
    return rmse, high, low


@pytest.mark.parametrize("seed", [0, 2])
def test_at_the_papers_rate_the_default_members_keep_fitting_every_row(seed):
    rmse, high, low = worst_after_warm_start(DeepEnsemble(1).nll_beta, seed)
    assert rmse < 1.0            # every member's mean beats the constant predictor throughout
    assert high < 100            # no row's variance runs away (the target's is 1)
    assert low > VARIANCE_FLOOR  # nor is pinned at the floor


def test_with_the_plain_nll_the_same_members_abandon_rows():
    """The mechanism: the plain NLL scales a row's mean gradient by 1 / variance. Rows that get a
    large variance in the first large steps stop being fitted, their means drift with the shared
    features, their residuals and so their variances grow: the means end worse than a constant."""
    rmse, high, _ = worst_after_warm_start(0.0, seed=0)
    assert rmse > 2.0 and high > 200


def test_the_loss_value_is_the_nll_and_its_gradient_the_variance_weighted_one():
    plain, weighted = (DeepEnsemble(3, 2, num_members=2, hidden_dim=8, seed=0, nll_beta=b) for b in (0.0, 0.7))
    xs, ys = torch.randn(10, 3), torch.randn(10, 2)
    torch.testing.assert_close(weighted.member_losses(xs, ys), plain.member_losses(xs, ys))

    out = plain.members(xs.expand(2, -1, -1)).detach().requires_grad_()
    mean, var = mean_and_variance(out)
    rows = 0.5 * (var.log() + (ys - mean).square() / var)
    (expected,) = torch.autograd.grad((rows * var.detach() ** 0.7).sum(-1).mean(-1).sum(), out)
    (got,) = torch.autograd.grad(weighted.head.loss(out, ys).sum(), out)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("value, error", [(-0.1, ValueError), (1.5, ValueError), ("0.5", TypeError),
                                          (float("nan"), ValueError)])
def test_nll_beta_outside_0_to_1_is_refused(value, error):
    with pytest.raises(error, match="'nll_beta'.*Got"):
        DeepEnsemble(3, nll_beta=value)
