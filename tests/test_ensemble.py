"""The ensemble module: paper-correct losses, FGSM, aggregation, units, save and load."""

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, TensorDataset, Trainer
from ray_ensembles.model.predictions import GaussianMixturePrediction

pytestmark = pytest.mark.unit


def test_loss_is_the_papers_gaussian_nll():
    e = DeepEnsemble(dim_in=3, dim_out=2, num_members=2, seed=0)
    xs, ys = torch.randn(10, 3), torch.randn(10, 2)
    out = e.members(xs.expand(2, -1, -1))
    mean, var = out[..., :2], F.softplus(out[..., 2:]) + 1e-6
    expected = torch.distributions.Normal(mean, var.sqrt()).log_prob(ys).neg().sum(-1).mean(-1)
    torch.testing.assert_close(e.member_losses(xs, ys), expected)


def test_fgsm_takes_the_input_gradient_only_and_steps_eps_times_each_inputs_range():
    torch.manual_seed(0)
    e = DeepEnsemble(dim_in=2, num_members=3, hidden_dim=8, seed=1,
                     use_adversarial_training=True, adversarial_eps=0.05)
    X = torch.stack([torch.linspace(0, 100, 50), torch.linspace(-0.1, 0.1, 50)], 1)  # ranges 100, 0.2
    y = torch.randn(50, 1)
    e.fit_normalization(X, y)
    torch.testing.assert_close(e.adversarial_step, 0.05 * torch.tensor([100.0, 0.2]) / X.std(0, correction=0))

    e(X, y)  # the call used to train must not write weight gradients
    assert all(p.grad is None for p in e.parameters())

    xs, ys = e.standardizer.standardize_x(X).expand(3, -1, -1).clone().requires_grad_(), e.standardizer.standardize_y(y)
    clean = e.head.loss(e.members(xs), ys)
    (g,) = torch.autograd.grad(clean.sum(), xs)
    x_adv = xs + e.adversarial_step * g.sign()
    expected = clean + e.head.loss(e.members(x_adv), ys)
    torch.testing.assert_close(e.member_losses(e.standardizer.standardize_x(X), ys), expected)


def test_classifier_supports_adversarial_training():
    e = DeepEnsembleClassifier(dim_in=4, num_classes=3, num_members=2, depth=1, hidden_dim=8,
                               use_adversarial_training=True, adversarial_eps=0.1)
    X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    xs = e.standardizer.standardize_x(X).expand(2, -1, -1).clone().requires_grad_()
    clean = e.head.loss(e.members(xs), y)
    (grad,) = torch.autograd.grad(clean.sum(), xs)
    adversarial = e.head.loss(e.members(xs + e.adversarial_step * grad.sign()), y)
    torch.testing.assert_close(e.member_losses(e.standardizer.standardize_x(X), y), clean + adversarial)
    assert (adversarial > clean).all()  # the step is the loss's ascent direction, not zero


def test_mixture_variance_is_stable_and_never_negative_for_targets_near_1e4():
    g = torch.Generator().manual_seed(0)
    mean = 1e4 + 1e-2 * torch.randn(5, 1000, 1, generator=g)
    var = 1e-4 * torch.rand(5, 1000, 1, generator=g) + 1e-6
    pred = GaussianMixturePrediction(mean, var)
    m64, v64 = mean.double(), var.double()
    exact = v64.mean(0) + (m64 - m64.mean(0)).square().mean(0)
    textbook = (var + mean.square()).mean(0) - mean.mean(0).square()  # float32: cancels
    assert (textbook < 0).any()
    assert (pred.variance >= 0).all()
    torch.testing.assert_close(pred.variance.double(), exact, rtol=2e-2, atol=1e-7)
    torch.testing.assert_close(pred.aleatoric + pred.epistemic, pred.variance)


def test_predictions_come_back_in_original_units(toy_data, tmp_path):
    """Standardisation makes training on a*y + b the same problem as on y."""
    X, y = toy_data
    a, b = 1000.0, 1e4

    def fit(target):
        e = DeepEnsemble(dim_in=2, num_members=2, hidden_dim=16, seed=3)
        Trainer(e, TensorDataset(X * 50 - 7, target), train_batch_size=40, train_num_steps=30,
                results_folder=tmp_path / str(float(target[0]))).train()
        return e(X * 50 - 7)

    small, large = fit(y), fit(a * y + b)
    torch.testing.assert_close(large.mean, a * small.mean + b, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(large.variance, a * a * small.variance, rtol=1e-3, atol=1e-3)
    assert (large.variance > 0).all()


def test_exact_mixture_log_prob_matches_a_direct_sum():
    pred = GaussianMixturePrediction(torch.randn(3, 4, 1), torch.rand(3, 4, 1) + 0.1)
    y = torch.randn(4, 1)
    density = torch.distributions.Normal(pred.member_mean, pred.member_variance.sqrt()).log_prob(y).exp()
    torch.testing.assert_close(pred.log_prob(y), density.mean(0).log().squeeze(-1))


def test_interval_has_the_requested_coverage_of_the_moment_matched_gaussian():
    pred = GaussianMixturePrediction(torch.zeros(1, 1, 1), torch.full((1, 1, 1), 4.0))
    lo, hi = pred.interval(0.9)
    assert hi.item() == pytest.approx(1.6448536 * 2, rel=1e-5) and lo.item() == pytest.approx(-hi.item())


def test_classifier_prediction_summaries():
    e = DeepEnsembleClassifier(dim_in=5, num_classes=4, num_members=3, hidden_dim=8, depth=2)
    pred = e(torch.randn(7, 5))
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(7))
    assert pred.variance.shape == pred.mutual_information.shape == (7, 1)
    assert (pred.mutual_information >= 0).all()
    assert (pred.variance <= math.log(4) + 1e-6).all()
    torch.testing.assert_close(pred.variance, pred.aleatoric + pred.mutual_information)


def test_batch_norm_members_predict_with_running_statistics():
    e = DeepEnsembleClassifier(dim_in=3, num_classes=2, num_members=2, hidden_dim=8, depth=2,
                               batch_norm=True)
    X = torch.randn(9, 3)
    single = torch.cat([e(X[i:i + 1]).probs for i in range(9)])
    torch.testing.assert_close(single, e(X).probs)  # rows do not affect each other at inference
    assert e.training  # predicting does not change the module's mode


# save and load -----------------------------------------------------------------------------------

@pytest.fixture
def saved(toy_data, tmp_path):
    X, y = toy_data
    e = DeepEnsemble(dim_in=2, num_members=3, hidden_dim=8, seed=2)
    Trainer(e, TensorDataset(X, y, feature_names=["a", "b"]), train_batch_size=50,
            train_num_steps=10, results_folder=tmp_path / "r").train()
    return e, e.save(tmp_path / "ens"), X


def test_save_then_load_gives_identical_predictions(saved):
    e, path, X = saved
    loaded = DeepEnsemble.load(path)
    assert loaded.member_ids == [0, 1, 2] and loaded.feature_names == ["a", "b"]
    a, b = e(X), loaded(X)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.variance, b.variance)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["library_version"] and manifest["normalization"]["y_std"]
    assert [m["seed"] for m in manifest["members"]] == e.member_seeds


def test_load_assembles_any_member_subset(saved):
    e, path, X = saved
    sub = DeepEnsemble.load(path, members=[0, 2])
    assert sub.member_ids == [0, 2]
    torch.testing.assert_close(sub(X).member_mean, e(X).member_mean[[0, 2]])
    torch.testing.assert_close(e.subset([2, 0])(X).member_mean, e(X).member_mean[[2, 0]])
    with pytest.raises(ValueError, match=r"'members' parameter of DeepEnsemble.load .* distinct ids .*\[0, 0\]"):
        DeepEnsemble.load(path, members=[0, 0])


def test_a_pickle_payload_is_refused_without_running(saved, tmp_path):
    e, path, X = saved
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    member = path / "member_001.safetensors"
    member.write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((path / "manifest.json").read_text())  # an attacker fixes the hash too
    import hashlib
    manifest["members"][1]["sha256"] = hashlib.sha256(member.read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a ray_ensembles safetensors file"):
        DeepEnsemble.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "member_002.safetensors").unlink(), "is missing"),
    (lambda p: (p / "member_002.safetensors").write_bytes((p / "member_002.safetensors").read_bytes()[:-10]),
     "does not match the SHA-256"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    (lambda p: _edit_manifest(p, lambda m: m["config"].update(hidden_dim=9)), "has shape"),
    (lambda p: _edit_manifest(p, lambda m: m["members"][0].update(file="../../etc/passwd")), "file must be"),
    (lambda p: _edit_manifest(p, lambda m: m.update(format_version=99)), "format_version"),
])
def test_damaged_ensembles_give_clear_errors(saved, damage, message):
    _, path, _ = saved
    damage(path)
    with pytest.raises(ValueError, match=message):
        DeepEnsemble.load(path)


def _edit_manifest(path, edit):
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_regression_ensemble_does_not_load_as_a_classifier(saved):
    with pytest.raises(ValueError, match="holds a regression ensemble"):
        DeepEnsembleClassifier.load(saved[1])


def test_a_failed_save_leaves_the_previous_one_intact(saved, monkeypatch):
    e, path, X = saved
    before = DeepEnsemble.load(path)(X).mean
    from ray_ensembles.io.manifest import Manifest

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Manifest, "write", crash)
    with pytest.raises(OSError):
        DeepEnsemble(dim_in=2, num_members=3, hidden_dim=8, seed=99).save(path)
    assert torch.equal(DeepEnsemble.load(path)(X).mean, before)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_random_sign_control_depends_on_member_and_step_only():
    e = DeepEnsemble(dim_in=2, num_members=3, use_adversarial_training=True, perturbation="random")
    xs, ys = torch.randn(10, 2), torch.randn(10, 1)
    a, b, c = (e.member_losses(xs, ys, step=s) for s in (4, 4, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(e.subset([2]).member_losses(xs, ys, step=4), a[2:])
    fgsm = DeepEnsemble(dim_in=2, num_members=3, use_adversarial_training=True)
    assert (fgsm.member_losses(xs, ys) >= a - 1e-6).all()  # the gradient's sign is the worst case, to first order
