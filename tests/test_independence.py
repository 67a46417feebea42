"""Members are independent: a member's result depends only on (seed, member id)."""

import pickle

import pytest
import torch

from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, MemberDivergedError, TensorDataset, Trainer
from ray_ensembles.loop import batches
from ray_ensembles.model.members import epoch_permutations, member_seed
from ray_ensembles.loop.training import EnsembleFit, TrainSettings

pytestmark = pytest.mark.unit

SETTINGS = dict(train_batch_size=32, train_num_steps=40, train_lr=3e-3, max_grad_norm=0.5,
                ema_decay=0.9, ema_update_every=1, save_every=1000)


def trained(data, tmp_path, **ensemble_kwargs):
    X, y = data
    ensemble = DeepEnsemble(dim_in=2, hidden_dim=16, depth=2, seed=11,
                            use_adversarial_training=True, adversarial_eps=0.02, **ensemble_kwargs)
    Trainer(ensemble, TensorDataset(X, y), results_folder=tmp_path / str(ensemble.member_ids),
            **SETTINGS).train()
    return ensemble


def assert_same_member(a, i, b, j, atol=1e-5):
    sa, sb = a.members.member_state(i), b.members.member_state(j)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=1e-4, msg=k)


def test_first_members_of_3_and_5_are_the_same_networks(toy_data, tmp_path):
    three = trained(toy_data, tmp_path, num_members=3)
    five = trained(toy_data, tmp_path, num_members=5)
    X = toy_data[0]
    for i in range(3):
        assert_same_member(three, i, five, i)
    torch.testing.assert_close(three(X).member_mean, five(X).member_mean[:3], atol=1e-4, rtol=1e-4)


def test_a_member_trained_alone_equals_the_same_member_in_an_ensemble(toy_data, tmp_path):
    together = trained(toy_data, tmp_path, num_members=3)
    alone = trained(toy_data, tmp_path, num_members=1, member_ids=[2])
    assert_same_member(together, 2, alone, 0)


def test_members_differ_in_init_and_data_order():
    e = DeepEnsemble(dim_in=3, num_members=3, seed=0)
    w = e.members.weights[0]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    orders = epoch_permutations(e.member_seeds, epoch=0, num_rows=50)
    assert not torch.equal(orders[0], orders[1])
    assert sorted(orders[0].tolist()) == list(range(50))  # every member sees every row
    assert not torch.equal(orders[0], epoch_permutations(e.member_seeds, 1, 50)[0])
    assert member_seed(0, 1) == member_seed(0, 1) != member_seed(1, 1)


def test_each_step_gives_every_member_its_own_rows_across_gathered_blocks(monkeypatch):
    """Rows are gathered a block of steps at a time; every step, across blocks and epochs (whose
    last block is shorter), sees the rows of its member's own order."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(230, 4, generator=g), torch.randn(230, 1, generator=g)
    e = DeepEnsemble(dim_in=4, num_members=3, hidden_dim=8, seed=0)
    monkeypatch.setattr(batches, "GATHER_BYTES", 3 * 3 * 10 * 4 * 5)  # 3 steps of 3 members x 10 rows
    fit = EnsembleFit(e, TensorDataset(X, y), TrainSettings(batch_size=10, num_steps=100), "cpu")
    assert fit.batches.steps_per_gather == 3 and fit.steps_per_epoch == 23
    for step in range(2 * fit.steps_per_epoch + 5):
        fit.step = step
        xs, ys = fit.batches(step)
        rows = fit.batches.rows(step)
        assert torch.equal(xs, fit.batches.xs[rows]) and torch.equal(ys, fit.batches.ys[rows])
        assert not torch.equal(rows[0], rows[1])


def test_a_nan_member_changes_no_other_member():
    """One stacked step (loss sum, backward, fused Adam) with member 1 poisoned."""
    def step(poison):
        torch.manual_seed(0)
        e = DeepEnsemble(dim_in=2, num_members=3, hidden_dim=8, seed=5,
                         use_adversarial_training=True)
        if poison:
            with torch.no_grad():
                e.members.weights[0][1].fill_(float("nan"))
        opt = torch.optim.Adam(e.members.parameters(), lr=1e-2, fused=True)
        xs, ys = torch.randn(3, 16, 2), torch.randn(3, 16, 1)
        losses = e.member_losses(xs, ys)
        losses.sum().backward()
        opt.step()
        return losses.detach(), e

    clean_losses, clean = step(False)
    bad_losses, bad = step(True)
    assert torch.isnan(bad_losses[1]) and torch.isfinite(bad_losses[[0, 2]]).all()
    for i in (0, 2):
        assert_same_member(clean, i, bad, i, atol=0)


def test_divergence_stops_with_the_member_step_and_last_loss(toy_data, tmp_path):
    X, y = toy_data
    e = DeepEnsemble(dim_in=2, num_members=3, hidden_dim=8, seed=0)
    fit = EnsembleFit(e, TensorDataset(X, y), TrainSettings(batch_size=50, num_steps=10), "cpu")
    fit.train_step()
    with torch.no_grad():
        e.members.biases[-1][2].fill_(float("inf"))
    with pytest.raises(MemberDivergedError, match=r"Member 2 diverged at step 1:.*last finite loss") as raised:
        fit.train_step()
    copy = pickle.loads(pickle.dumps(raised.value))  # as a Ray worker sends it
    assert (copy.member_id, copy.step, str(copy)) == (2, 1, str(raised.value))


def test_classifier_members_are_independent_too(tmp_path):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(120, 4, generator=g), torch.randint(0, 3, (120,), generator=g)

    def train(n):
        e = DeepEnsembleClassifier(dim_in=4, num_classes=3, num_members=n, hidden_dim=8, depth=2,
                                   batch_norm=True, use_adversarial_training=True, seed=3)
        Trainer(e, TensorDataset(X, y), train_batch_size=20, train_num_steps=15,
                results_folder=tmp_path / str(n)).train()
        return e

    two, four = train(2), train(4)
    for i in range(2):
        assert_same_member(two, i, four, i)


@pytest.mark.parametrize("factory", [None, "cnn"])
def test_restart_re_initialises_only_the_diverged_member(toy_data, factory):
    X, y = toy_data
    X = X.repeat(1, 32) if factory else X  # 64 inputs: an 8x8 image for the factory members
    kwargs = dict(dim_in=X.shape[1], num_members=3, seed=0, use_adversarial_training=True)
    if factory:
        from test_factory_members import small_cnn
        kwargs["member_factory"] = lambda: torch.nn.Sequential(small_cnn()[:-1], torch.nn.Linear(64, 2))
    else:
        kwargs["hidden_dim"] = 8
    settings = TrainSettings(batch_size=50, num_steps=12, ema_decay=0.9, ema_update_every=1,
                             max_grad_norm=1.0, on_divergence="restart")

    def run(poison):
        e = DeepEnsemble(**kwargs)
        fit = EnsembleFit(e, TensorDataset(X, y), settings, "cpu")
        for step in range(12):
            if poison and step == 5:
                with torch.no_grad():
                    for p in (e.members.nets[1].parameters() if factory else [w[1] for w in e.members.weights]):
                        p.fill_(float("nan"))
            fit.train_step()
        fit.finish()
        return e, fit

    clean, _ = run(False)
    restarted, fit = run(True)
    assert fit.attempts == [0, 1, 0]
    assert restarted.member_seeds[1] == member_seed(0, 1, attempt=1) != clean.member_seeds[1]
    assert all(torch.isfinite(v).all() for v in restarted.members.member_state(1).values())
    for i in (0, 2):
        assert_same_member(clean, i, restarted, i, atol=0)


def test_restarts_are_bounded(toy_data):
    X, y = toy_data
    e = DeepEnsemble(dim_in=2, num_members=2, hidden_dim=8)
    fit = EnsembleFit(e, TensorDataset(X, y), TrainSettings(batch_size=50, num_steps=10, on_divergence="restart",
                                             max_restarts=0), "cpu")
    with torch.no_grad():
        e.members.weights[0][1].fill_(float("nan"))
    with pytest.raises(MemberDivergedError, match="Member 1 diverged at step 0"):
        fit.train_step()
