"""Split-conformal intervals and adaptive prediction sets: the finite-sample guarantee on
exchangeable rows, agreement with a reference implementation (crepes), and the scores' life in
the ensemble: saved, loaded, replaced by calibrate, dropped by a subset, in the predict job's
columns and the Serve app's answers."""

import json
import math

import numpy as np
import pytest
import torch

from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, TensorDataset, Trainer
from ray_ensembles.loop.data import cubic_toy

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def regressor(tmp_path_factory):
    e = DeepEnsemble(1, num_members=3, seed=0)
    Trainer(e, cubic_toy(200, 0), train_num_epochs=20, train_lr=0.05,
            results_folder=tmp_path_factory.mktemp("run")).train()
    return e


def blobs(n: int, seed: int):
    """Three overlapping classes in 2-D: no classifier is sure of every row."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])
    return centers[y] + torch.randn(n, 2, generator=g), y


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    X, y = blobs(600, 0)
    c = DeepEnsembleClassifier(2, 3, num_members=3, seed=0)
    Trainer(c, TensorDataset(X, y), train_num_epochs=10, results_folder=tmp_path_factory.mktemp("run")).train()
    return c


def test_conformal_intervals_cover_exchangeable_rows_as_guaranteed(regressor):
    """Coverage in [1 - alpha, 1 - alpha + 1/(n + 1)] on average over draws: n = 24 held-out rows
    at 90% give exactly ceil(25 * 0.9) / 25 = 0.92 in expectation."""
    e, n, draws = regressor, 24, 300
    covered, gaussian = [], []
    for draw in range(draws):
        held_out, test = cubic_toy(n, 1000 + draw), cubic_toy(400, 5000 + draw)
        e.conformalize(held_out.X, held_out.y)
        pred = e.predict(test.X)
        lower, upper = pred.conformal_interval(0.9)
        covered.append(((test.y >= lower) & (test.y <= upper)).float().mean().item())
        lower, upper = pred.interval(0.9)
        gaussian.append(((test.y >= lower) & (test.y <= upper)).float().mean().item())
    average = float(np.mean(covered))
    assert 0.9 <= average <= 0.9 + 1 / (n + 1), average
    assert abs(average - 0.92) < 0.01, average
    assert abs(np.mean(gaussian) - 0.92) > 0.02  # the Gaussian interval alone is not this close


def test_adaptive_prediction_sets_cover_at_least_the_level_and_are_prefixes_by_probability(classifier):
    c, n = classifier, 49
    covered, sizes = [], []
    for draw in range(200):
        (Xh, yh), (Xt, yt) = blobs(n, 1000 + draw), blobs(300, 5000 + draw)
        c.conformalize(Xh, yh)
        pred = c.predict(Xt)
        sets = pred.prediction_set(0.8)
        covered.append(sets[torch.arange(len(yt)), yt].float().mean().item())
        sizes.append(sets.sum(-1).float().mean().item())
    assert np.mean(covered) >= 0.8, np.mean(covered)
    assert 1 < np.mean(sizes) < 3  # adaptive: neither always one class nor all of them
    assert sets.any(-1).all()  # never empty
    order = pred.probs.argsort(-1, descending=True)
    ranked = sets.gather(-1, order).int()
    assert (ranked[:, 1:] <= ranked[:, :-1]).all()  # the most probable classes first, no gaps
    assert (pred.prediction_set(0.95).int() >= sets.int()).all()  # a higher level, a larger set


def test_the_intervals_agree_with_crepes(regressor):
    import crepes  # the reference implementation, in the test extra: missing, this fails rather than skips
    e = regressor
    held_out, test = cubic_toy(57, 1), cubic_toy(300, 2)
    e.conformalize(held_out.X, held_out.y)
    cal, pred = e.predict(held_out.X), e.predict(test.X)
    reference = crepes.ConformalRegressor().fit(residuals=(held_out.y - cal.mean)[:, 0].numpy(),
                                               sigmas=cal.stddev[:, 0].numpy())
    for coverage in (0.5, 0.8, 0.9, 0.95):
        expected = reference.predict_int(y_hat=pred.mean[:, 0].numpy(), sigmas=pred.stddev[:, 0].numpy(),
                                         confidence=coverage)
        lower, upper = pred.conformal_interval(coverage)
        np.testing.assert_allclose(np.stack([lower[:, 0], upper[:, 0]], 1), expected, rtol=1e-5, atol=1e-4)


def test_conformal_scores_are_saved_kept_apart_from_calibrate_and_dropped_by_a_subset(regressor, tmp_path):
    e = regressor
    held_out, test = cubic_toy(20, 1), cubic_toy(50, 2)
    e.calibration = None
    with pytest.raises(ValueError, match=r"conformal_interval needs conformal scores: fit them with "
                                         r"ensemble.conformalize"):
        e.predict(test.X).conformal_interval(0.9)
    e.calibrate(held_out.X, held_out.y)
    scale = e.calibration["variance_scale"]
    e.conformalize(held_out.X, held_out.y)
    assert e.calibration["variance_scale"] == scale and len(e.calibration["conformal_scores"][0]) == 20
    lower, upper = e.predict(test.X).conformal_interval(0.9)
    assert torch.isinf(e.predict(test.X).conformal_interval(0.96)[0]).all()  # ceil(21 * 0.96) > 20
    before = e.calibration
    with pytest.raises(ValueError, match="'y' parameter"):
        e.conformalize(held_out.X, held_out.y[:5])
    assert e.calibration == before  # a refused call changes nothing
    e.save(tmp_path / "ens")
    manifest = json.loads((tmp_path / "ens" / "manifest.json").read_text())
    assert manifest["format_version"] == 6  # older readers refuse it
    same = DeepEnsemble.load(tmp_path / "ens")
    assert torch.equal(same.predict(test.X).conformal_interval(0.9)[0], lower)
    assert DeepEnsemble.load(tmp_path / "ens", members=[0, 1]).calibration is None
    e.calibrate(held_out.X, held_out.y)  # fitted anew: the scores of the old predictions go
    assert set(e.calibration) == {"variance_scale"}
    manifest["calibration"]["conformal_scores"] = [[1.0, math.inf]]
    (tmp_path / "ens" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'conformal_scores' of DeepEnsemble's calibration must be 1 lists"):
        DeepEnsemble.load(tmp_path / "ens")


def test_the_predict_jobs_columns_and_the_serve_apps_answers_carry_them(regressor, classifier):
    from ray_ensembles.model.inference import summary_columns
    from ray_ensembles.serving import describe, response_rows

    held_out, test = cubic_toy(30, 1), cubic_toy(5, 2)
    regressor.conformalize(held_out.X, held_out.y)
    pred = regressor.predict(test.X)
    columns = summary_columns(pred, 0.8)
    lower, upper = pred.conformal_interval(0.8)
    assert np.array_equal(columns["conformal_lower_0.8"], lower[:, 0].numpy())
    assert response_rows(pred, 0.8)[0]["conformal_upper_0.8"] == pytest.approx(float(upper[0, 0]))
    unbounded = response_rows(pred, 0.97)[0]  # ceil(31 * 0.97) > 30 rows: an infinite interval
    assert unbounded["conformal_lower_0.97"] is None and unbounded["conformal_upper_0.97"] is None
    json.dumps(unbounded, allow_nan=False)  # what the Serve app's JSONResponse does: no 500
    assert describe(regressor)["conformal_rows"] == 30
    Xh, yh = blobs(40, 1)
    classifier.conformalize(Xh, yh)
    pred = classifier.predict(blobs(5, 2)[0])
    sets = pred.prediction_set(0.9)
    columns = summary_columns(pred, 0.9)
    assert np.array_equal(np.stack([columns[f"in_set_{k}"] for k in range(3)], 1), sets.numpy())
    answered = [row["prediction_set"] for row in response_rows(pred, 0.9)]
    assert answered == [torch.nonzero(s)[:, 0].tolist() for s in sets]
    assert describe(classifier)["conformal_rows"] == 40 and describe(classifier)["calibration"] is None
