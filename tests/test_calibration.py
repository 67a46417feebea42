"""Post-hoc calibration (Ensemble.calibrate): a variance scale per output, or a temperature,
fitted on validation rows, saved in the manifest and applied to every prediction."""

import json

import pytest
import torch

from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, TensorDataset, Trainer

G = torch.Generator().manual_seed(0)
X = torch.rand(400, 2, generator=G) * 6 - 3
F = torch.cat([X[:, :1].sin(), X[:, 1:] ** 2 / 4], 1)  # two outputs


def trained(ensemble, X, y, tmp_path, steps=300):
    Trainer(ensemble, TensorDataset(X, y), results_folder=tmp_path, train_num_steps=steps, train_lr=1e-2).train()
    return ensemble


@pytest.fixture(scope="module")
def overconfident(tmp_path_factory):
    """A regressor trained on noise of 0.05, and validation rows whose noise is 0.5 on the first
    output only: its variance is far too small there, and about right on the second."""
    ensemble = trained(DeepEnsemble(2, 2, num_members=3, hidden_dim=32, seed=0),
                       X, F + 0.05 * torch.randn(400, 2, generator=G), tmp_path_factory.mktemp("reg"))
    X_val = torch.rand(300, 2, generator=G) * 6 - 3
    F_val = torch.cat([X_val[:, :1].sin(), X_val[:, 1:] ** 2 / 4], 1)
    y_val = F_val + torch.randn(300, 2, generator=G) * torch.tensor([0.5, 0.05])
    return ensemble, X_val, y_val


@pytest.mark.unit
def test_calibration_lowers_the_validation_nll_of_a_misscaled_regressor(overconfident):
    ensemble, X_val, y_val = overconfident
    raw = ensemble(X_val)
    fitted = ensemble.calibrate(X_val, y_val)
    scale = fitted["variance_scale"]
    assert scale[0] > 10 * scale[1] and scale[0] > 5  # the mis-scaled output, and only it, widened
    assert fitted["val_nll_after"] < fitted["val_nll_before"] - 0.5
    pred = ensemble(X_val)  # applied to every prediction: variance, both parts, scaled; mean kept
    torch.testing.assert_close(pred.mean, raw.mean)
    for part in ("variance", "aleatoric", "epistemic"):
        torch.testing.assert_close(getattr(pred, part), getattr(raw, part) * torch.tensor(scale), rtol=1e-5, atol=1e-8)


@pytest.mark.unit
def test_calibration_is_saved_and_loaded_and_a_subset_starts_without_it(overconfident, tmp_path):
    ensemble, X_val, y_val = overconfident
    ensemble.calibrate(X_val, y_val)
    ensemble.save(tmp_path / "ens")
    manifest = json.loads((tmp_path / "ens" / "manifest.json").read_text())
    assert manifest["format_version"] == 4 and manifest["calibration"] == ensemble.calibration
    loaded = DeepEnsemble.load(tmp_path / "ens")
    assert torch.equal(loaded(X_val).variance, ensemble(X_val).variance)
    assert DeepEnsemble.load(tmp_path / "ens", members=[0, 1]).calibration is None
    assert ensemble.subset([0, 1]).calibration is None

    manifest["calibration"] = {"variance_scale": [1.0, -2.0]}
    (tmp_path / "ens" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="variance_scale.*2 positive finite numbers.*-2.0"):
        DeepEnsemble.load(tmp_path / "ens")


@pytest.mark.unit
def test_a_temperature_lowers_the_validation_nll_of_an_overconfident_classifier(tmp_path):
    labels = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    clf = trained(DeepEnsembleClassifier(2, 3, num_members=2, hidden_dim=32, depth=1, seed=0), X, labels, tmp_path)
    noisy = labels.clone()  # a third of the validation labels are wrong: the members are overconfident
    flip = torch.rand(400, generator=G) < 1 / 3
    noisy[flip] = (labels[flip] + 1) % 3
    fitted = clf.calibrate(X, noisy)
    assert fitted["temperature"] > 1.5 and fitted["val_nll_after"] < fitted["val_nll_before"]
    uncalibrated = clf.subset([0, 1])  # the same members, no temperature: it softens, it hardly reorders
    assert (clf(X).probs.argmax(-1) == uncalibrated(X).probs.argmax(-1)).float().mean() > 0.95
    clf.save(tmp_path / "clf")
    assert DeepEnsembleClassifier.load(tmp_path / "clf").calibration == clf.calibration


@pytest.mark.unit
def test_a_calibration_of_the_wrong_kind_is_refused_and_training_drops_it(overconfident, tmp_path):
    ensemble, X_val, y_val = overconfident
    ensemble.calibration = None
    with pytest.raises(ValueError, match="calibration must be"):
        ensemble.calibration = {"temperature": 2.0}
    ensemble.calibrate(X_val, y_val)
    Trainer(ensemble, TensorDataset(X, F), results_folder=tmp_path, train_num_steps=1).train()
    assert ensemble.calibration is None  # fitted to the members as they were


@pytest.mark.unit
def test_a_temperature_is_fitted_through_probabilities_that_underflowed_to_zero():
    from ray_ensembles.model.heads import CategoricalHead
    from ray_ensembles.model.predictions import CategoricalPrediction

    probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.9, 0.1]]] * 2)  # (M=2, B=4, C=2)
    fitted, before, after = CategoricalHead("test", 2).fit_calibration(CategoricalPrediction(probs), torch.tensor([0, 1, 1, 0]))
    assert fitted["temperature"] > 1 and after < before  # the wrong, certain row pulls it up, finitely


@pytest.mark.unit
def test_a_refused_calibration_keeps_the_one_fitted_before(overconfident):
    ensemble, X_val, y_val = overconfident
    fitted = ensemble.calibrate(X_val, y_val)["variance_scale"]
    bad_x = X_val.clone()
    bad_x[3, 0] = float("nan")
    bad_y = y_val.clone()
    bad_y[5, 1] = float("nan")
    for x, y in ((bad_x, y_val), (X_val, bad_y), (X_val[:10], y_val)):
        with pytest.raises(ValueError):
            ensemble.calibrate(x, y)
        assert ensemble.calibration["variance_scale"] == fitted
