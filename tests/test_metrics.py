"""Each metric against an independent computation: scipy, brute force, or hand-worked values."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from scipy.special import logsumexp

from ray_ensembles.model import metrics

pytestmark = pytest.mark.unit

g = torch.Generator().manual_seed(0)
MEAN = torch.randn(50, 2, generator=g, dtype=torch.float64)
VAR = torch.rand(50, 2, generator=g, dtype=torch.float64) + 0.2
Y = torch.randn(50, 2, generator=g, dtype=torch.float64)


def test_gaussian_nll_matches_scipy():
    expected = -stats.norm.logpdf(Y, MEAN, VAR.sqrt()).sum(-1).mean()
    assert metrics.gaussian_nll(MEAN, VAR, Y) == pytest.approx(expected, rel=1e-12)


def test_mixture_nll_matches_scipy_logsumexp():
    means = torch.randn(4, 50, 2, generator=g, dtype=torch.float64)
    variances = torch.rand(4, 50, 2, generator=g, dtype=torch.float64) + 0.1
    logpdf = stats.norm.logpdf(Y.numpy(), means.numpy(), variances.sqrt().numpy()).sum(-1)  # (M, B)
    expected = -(logsumexp(logpdf, axis=0) - math.log(4)).mean()
    assert metrics.mixture_gaussian_nll(means, variances, Y) == pytest.approx(expected, rel=1e-12)
    # one member: the mixture is that Gaussian
    assert metrics.mixture_gaussian_nll(MEAN[None], VAR[None], Y) == pytest.approx(
        metrics.gaussian_nll(MEAN, VAR, Y), rel=1e-12)


def test_rmse_by_hand():
    assert metrics.rmse(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])) == pytest.approx(math.sqrt(2.5))


def test_crps_matches_numerical_integration():
    mu, sigma, y = 0.3, 1.7, -0.4
    value, _ = integrate.quad(lambda z: (stats.norm.cdf(z, mu, sigma) - (z >= y)) ** 2, -40, 40,
                              points=[y], limit=200)
    got = metrics.crps_gaussian(torch.tensor([mu]), torch.tensor([sigma ** 2]), torch.tensor([y]))
    assert got == pytest.approx(value, rel=1e-5)


def test_calibration_curve_is_diagonal_for_calibrated_predictions_and_hand_case():
    rng = torch.Generator().manual_seed(1)
    mean, var = torch.randn(20000, 1, generator=rng), torch.rand(20000, 1, generator=rng) + 0.5
    y = mean + var.sqrt() * torch.randn(20000, 1, generator=rng)
    expected, observed = metrics.calibration_curve(mean, var, y)
    assert (observed - expected).abs().max() < 0.015
    assert metrics.miscalibration_area(mean, var, y) < 0.01
    # all residuals at 1 sigma: covered by intervals of level >= 68.27% only
    exp, obs = metrics.calibration_curve(torch.zeros(4), torch.ones(4), torch.ones(4) * 0.999)
    assert obs[exp < 0.68].eq(0).all() and obs[exp > 0.69].eq(1).all()
    # overconfident by 2x: area is large
    assert metrics.miscalibration_area(mean, var / 4, y) > 0.2


PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.5, 0.0]])
LABELS = torch.tensor([0, 2, 2, 1])


def test_classification_metrics_by_hand():
    assert metrics.classification_nll(PROBS, LABELS) == pytest.approx(
        -(math.log(0.7) + math.log(0.1) + math.log(0.4) + math.log(0.5)) / 4)
    assert metrics.accuracy(PROBS, LABELS) == pytest.approx(0.5)  # row 3 ties, argmax picks 0
    brier = ((0.09 + 0.04 + 0.01) + (0.01 + 0.64 + 0.81) + (0.09 + 0.09 + 0.36) + (0.25 + 0.25)) / 12
    assert metrics.brier_score(PROBS, LABELS) == pytest.approx(brier)


def test_ece_by_hand():
    # 3 bins: confidences 0.7 -> bin 2 (correct); 0.8 -> bin 2 (wrong); 0.4 -> bin 1 (correct);
    # 0.5 -> bin 1 (wrong). Bin 1: |0.5 - 0.45| * 2/4; bin 2: |0.5 - 0.75| * 2/4.
    assert metrics.expected_calibration_error(PROBS, LABELS, num_bins=3) == pytest.approx(
        0.05 * 0.5 + 0.25 * 0.5)


def test_entropy_and_mutual_information_match_scipy():
    assert metrics.entropy(PROBS).numpy() == pytest.approx(stats.entropy(PROBS.numpy(), axis=-1))
    member = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident members that disagree
    assert metrics.mutual_information(member).item() == pytest.approx(math.log(2))
    agree = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])  # unsure but agree: no epistemic part
    assert metrics.mutual_information(agree).item() == pytest.approx(0.0, abs=1e-7)


def test_auroc_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    s_in, s_out = rng.integers(0, 5, 40).astype(float), rng.integers(1, 7, 30).astype(float)
    pairs = (s_out[None, :] > s_in[:, None]) + 0.5 * (s_out[None, :] == s_in[:, None])
    got = metrics.auroc(torch.tensor(s_in), torch.tensor(s_out))
    assert got == pytest.approx(pairs.mean())
    assert metrics.auroc(torch.zeros(3), torch.ones(3)) == 1.0
