"""Ensembles of members of several configurations (ray_ensembles.combine): the members of a
hyper-deep ensemble. They stack by shape, predict the mixture of all, save, load and subset."""

import json

import numpy as np
import pytest
import torch

from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, TensorDataset, Trainer, combine
from ray_ensembles.model.inference import prediction_columns
from ray_ensembles.serving import parse_request, predict_parts, response_rows

G = torch.Generator().manual_seed(0)
X = torch.randn(300, 2, generator=G)
Y = X[:, :1].sin() + 0.1 * torch.randn(300, 1, generator=G)
SHAPES = [(16, 1, 1e-3), (32, 2, 3e-3), (16, 1, 1e-2)]  # hidden_dim, depth, learning rate


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Three trained 2-member ensembles: two of one shape (other seeds and rates), one of another."""
    out = []
    for k, (hidden, depth, lr) in enumerate(SHAPES):
        ensemble = DeepEnsemble(2, 1, num_members=2, hidden_dim=hidden, depth=depth, seed=k)
        Trainer(ensemble, TensorDataset(X, Y), results_folder=tmp_path_factory.mktemp(str(k)),
                train_num_steps=30 + 10 * k, train_lr=lr).train()
        ensemble.feature_names = ["a", "b"]
        out.append(ensemble)
    return out


def combined(parts):
    return combine(parts, [{"lr": lr} for _, _, lr in SHAPES])


def member_means(parts, x):
    return torch.cat([p(x).member_mean for p in parts])


@pytest.mark.unit
def test_a_combined_ensemble_is_the_mixture_of_all_members_stacked_by_shape(parts):
    ens = combined(parts)
    assert ens.member_ids == list(range(6)) and ens.is_combined
    assert [(c["hidden_dim"], c["depth"], c["hyperparameters"]["lr"]) for c in ens.member_configs] == \
        [(h, d, lr) for h, d, lr in SHAPES for _ in range(2)]
    assert [g.num_members for g in ens.members.groups] == [4, 2]  # one stacked pass per shape
    pred = ens(X[:50])
    torch.testing.assert_close(pred.member_mean, member_means(parts, X[:50]))
    torch.testing.assert_close(pred.member_variance, torch.cat([p(X[:50]).member_variance for p in parts]))
    twice = combine([parts[0], parts[0]])  # chosen twice (greedy selection with replacement): counted twice
    torch.testing.assert_close(twice(X[:50]).mean, parts[0](X[:50]).mean)
    assert twice.num_members == 4


@pytest.mark.unit
def test_a_combined_ensemble_saves_loads_and_subsets_with_each_members_configuration(parts, tmp_path):
    ens = combined(parts)
    ens.calibrate(X[:100], Y[:100])
    ens.save(tmp_path / "hyper")
    manifest = json.loads((tmp_path / "hyper" / "manifest.json").read_text())
    assert manifest["format_version"] == 4
    assert [e["config"]["hidden_dim"] for e in manifest["members"]] == [16, 16, 32, 32, 16, 16]
    loaded = DeepEnsemble.load(tmp_path / "hyper")
    assert loaded.member_configs == ens.member_configs and loaded.calibration == ens.calibration
    assert torch.equal(loaded(X).variance, ens(X).variance)
    some = DeepEnsemble.load(tmp_path / "hyper", members=[2, 5])
    torch.testing.assert_close(some(X).member_mean, member_means(parts, X)[[2, 5]])
    assert [c["hidden_dim"] for c in some.member_configs] == [32, 16]
    assert ens.subset([3, 0]).member_configs[0] == ens.member_configs[3]

    # the prediction job's columns and the Serve app's rows come from the same mixture
    columns = prediction_columns(loaded, X[:5].double())
    np.testing.assert_allclose(columns["mean"], loaded(X[:5]).mean[:, 0].numpy(), rtol=1e-6)
    rows, coverage = parse_request({"rows": [{"b": 0.5, "a": -1.0}]}, loaded)
    served = response_rows(predict_parts(loaded, [rows])[0], coverage)[0]
    assert served["mean"] == pytest.approx(float(loaded(torch.tensor([[-1.0, 0.5]])).mean), rel=1e-6)


@pytest.mark.unit
def test_a_member_file_that_disagrees_with_its_configuration_is_refused(parts, tmp_path):
    combined(parts).save(tmp_path / "hyper")
    path = tmp_path / "hyper" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["members"][2]["config"]["hidden_dim"] = 16  # a member of 32 units said to have 16
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="member_002.safetensors"):
        DeepEnsemble.load(tmp_path / "hyper")
    manifest["members"][2]["config"] = "wide"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="member 2's 'config' must be a dict"):
        DeepEnsemble.load(tmp_path / "hyper")


@pytest.mark.unit
def test_combine_refuses_ensembles_that_do_not_share_inputs_outputs_or_statistics(parts, tmp_path):
    other_data = DeepEnsemble(2, 1, num_members=1, hidden_dim=16)
    other_data.fit_normalization(X * 2, Y)
    other_data.feature_names = ["a", "b"]
    unnamed = DeepEnsemble(2, 1, num_members=1)
    unnamed.standardizer.load_state(parts[0].standardizer.state())
    unnamed.feature_names = None
    two_outputs = DeepEnsemble(2, 2, num_members=1)
    two_outputs.feature_names = ["a", "b"]
    for bad, message in [([], "non-empty list"), ([parts[0], other_data], "standardisation statistics"),
                         ([parts[0], unnamed], "feature_names"),
                         ([parts[0], DeepEnsembleClassifier(2, 3, num_members=1)], "task"),
                         ([parts[0], two_outputs], "dim_out")]:
        with pytest.raises((TypeError, ValueError), match=message):
            combine(bad)
    with pytest.raises(ValueError, match="one dict per ensemble"):
        combine(parts, [{}])
    with pytest.raises(ValueError, match="'hyperparameters' parameter of combine must hold only JSON values"):
        combine(parts, [{"f": object()}] + [{}] * (len(parts) - 1))
    with pytest.raises(ValueError, match="combined from several"):
        Trainer(combined(parts), TensorDataset(X, Y), results_folder=tmp_path)
