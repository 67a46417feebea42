"""benchmarks/shift.py's shifted splits: reproducible, disjoint, and really out of the training rows."""

import numpy as np
import pytest

from benchmarks.shift import shifted_splits

pytestmark = pytest.mark.unit


def test_shifted_splits_are_reproducible_disjoint_and_outside_or_between_the_training_rows():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(203, 4)) @ rng.normal(size=(4, 4)) + np.array([0, 5, -3, 100])
    splits = shifted_splits(X)
    again = shifted_splits(X.copy())
    assert sorted(splits) == ["pc1_gap", "pc1_high", "pc1_low", "pc2_high", "pc2_low"]
    Z = (X - X.mean(0)) / X.std(0)
    first = np.linalg.svd(Z, full_matrices=False)[2][0]
    for name, (train, test) in splits.items():
        assert np.array_equal(train, again[name][0]) and np.array_equal(test, again[name][1])
        assert len(test) == 20 and np.intersect1d(train, test).size == 0
        assert np.array_equal(np.union1d(train, test), np.arange(203))
    p = Z @ first
    high, low = (p[splits["pc1_high"][1]], p[splits["pc1_high"][0]]), (p[splits["pc1_low"][1]], p[splits["pc1_low"][0]])
    # the sign of a component is arbitrary: one tail is above every training row, the other below
    assert {high[0].min() > high[1].max(), low[0].max() < low[1].min()} == {True} or \
        {high[0].max() < high[1].min(), low[0].min() > low[1].max()} == {True}
    gap_test, gap_train = p[splits["pc1_gap"][1]], p[splits["pc1_gap"][0]]
    inside = (gap_train > gap_test.min()) & (gap_train < gap_test.max())
    assert not inside.any() and (gap_train < gap_test.min()).sum() > 80 and (gap_train > gap_test.max()).sum() > 80


def test_the_toys_default_recipe_keeps_the_curve_inside_three_sd_beyond_the_data():
    """The train job's toy figure tells the truth at x = +/-5, +/-6 (the recipe before, beta-NLL
    with a cosine rate of 0.01 for 200 epochs, put the truth 17 sd away at x = 6)."""
    from benchmarks.shift import toy_row
    from common import TOY

    row = toy_row(TOY["nll_beta"], TOY["lr_schedule"], TOY["lr"], TOY["epochs"])
    assert all(abs(row[f"z_at_{x}"]) <= 3 for x in (-6, -5, 5, 6)), row
    assert row["share_of_[-6,6]_within_3sd"] >= 0.95


def test_the_band_narrows_beyond_the_data_as_far_as_the_members_fit_it():
    """The mechanism (docs/benchmarks.md, "Why the band narrows beyond the data"): members that fit
    the data (an aleatoric sd near the noise's 3 on the training points) agree beyond it, leaving
    the truth many sd away; the default's band holds the curve by fitting less (an aleatoric sd
    several times the noise) with members not yet pulled together."""
    from benchmarks.shift import toy_row
    from common import TOY

    fitted = toy_row(1.0, "cosine", 0.01, 200)  # the toy's recipe before
    default = toy_row(TOY["nll_beta"], TOY["lr_schedule"], TOY["lr"], TOY["epochs"])
    assert 1.5 < fitted["train_aleatoric_sd"] < 4.5 and max(abs(fitted[f"z_at_{x}"]) for x in (-6, 6)) > 5
    assert default["train_aleatoric_sd"] > 3 * 3
    for x in (-6, 6):
        assert fitted[f"epistemic_sd_at_{x}"] < default[f"epistemic_sd_at_{x}"] / 2
