"""Members built from any nn.Module factory keep every rule of the built-in ones."""

import pytest
import torch
from torch import nn

from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, TensorDataset, Trainer

pytestmark = pytest.mark.unit


def small_cnn():
    """A convnet for 8x8 single-channel images given as 64 flattened pixels."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))


class MeanAndVariance(nn.Module):
    """A regression member that returns (mean, raw variance)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 16), nn.Tanh())
        self.mean, self.raw_var = nn.Linear(16, 1), nn.Linear(16, 1)

    def forward(self, x):
        h = self.body(x)
        return self.mean(h), self.raw_var(h)


G = torch.Generator().manual_seed(0)
IMAGES, LABELS = torch.randn(90, 64, generator=G), torch.randint(0, 3, (90,), generator=G)


def cnn_ensemble(n, **kwargs):
    return DeepEnsembleClassifier(dim_in=64, num_classes=3, num_members=n, member_factory=small_cnn,
                                  use_adversarial_training=True, seed=2, **kwargs)


def train(e, tmp_path, **options):
    Trainer(e, TensorDataset(IMAGES, LABELS), train_batch_size=30, train_num_steps=12,
            results_folder=tmp_path, max_grad_norm=1.0, **options).train()
    return e


def test_factory_members_are_independent_and_differ(tmp_path):
    two, three = train(cnn_ensemble(2), tmp_path / "2"), train(cnn_ensemble(3), tmp_path / "3")
    for i in range(2):
        for k, v in two.members.member_state(i).items():
            torch.testing.assert_close(three.members.member_state(i)[k], v, msg=k)
    w = [three.members.member_state(i)["1.weight"] for i in range(3)]
    assert not torch.equal(w[0], w[1])


def test_factory_ensembles_save_and_load_with_the_factory(tmp_path):
    e = train(cnn_ensemble(3), tmp_path)
    path = e.save(tmp_path / "cnn")
    with pytest.raises(ValueError, match="built by the factory .*small_cnn.*member_factory="):
        DeepEnsembleClassifier.load(path)
    loaded = DeepEnsembleClassifier.load(path, member_factory=small_cnn)
    torch.testing.assert_close(loaded(IMAGES).probs, e(IMAGES).probs)
    pair = DeepEnsembleClassifier.load(path, members=[2, 0], member_factory=small_cnn)
    torch.testing.assert_close(pair(IMAGES).member_probs, e(IMAGES).member_probs[[2, 0]])


def test_factory_training_resumes_exactly(tmp_path):
    options = dict(ema_decay=0.9, ema_update_every=1, save_every=5)
    full = train(cnn_ensemble(2), tmp_path, **options)
    resumed = cnn_ensemble(2)
    trainer = Trainer(resumed, TensorDataset(IMAGES, LABELS), train_batch_size=30, train_num_steps=12,
                      results_folder=tmp_path, max_grad_norm=1.0, **options)
    trainer.load(1)
    trainer.train()
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)


def test_a_regression_factory_may_return_mean_and_raw_variance(tmp_path):
    X = torch.randn(100, 2, generator=G)
    y = X[:, :1] - X[:, 1:] + 0.1 * torch.randn(100, 1, generator=G)
    e = DeepEnsemble(dim_in=2, num_members=2, member_factory=MeanAndVariance, seed=0)
    before = e(X)
    Trainer(e, TensorDataset(X, y), train_num_epochs=30, train_lr=1e-2, results_folder=tmp_path).train()
    after = e(X)
    assert (after.mean - y).square().mean() < (before.mean - y).square().mean() / 4
    assert (after.variance > 0).all()


@pytest.mark.parametrize("factory, error, message", [
    (lambda: nn.Linear(64, 5), ValueError, r"mapping \(B, 64\) to \(B, 3\). Got output shape \(2, 5\)"),
    (lambda: "not a module", TypeError, "must return an nn.Module"),
    ("small_cnn", TypeError, "'member_factory'.*callable"),
])
def test_bad_factories_get_clear_errors(factory, error, message):
    with pytest.raises(error, match=message):
        DeepEnsembleClassifier(dim_in=64, num_classes=3, num_members=2, member_factory=factory)
