"""The in-process Trainer: learning, checkpoints, exact resume, EMA, AMP, bad input."""

import numpy as np
import pytest
import torch

from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, TensorDataset, Trainer
from ray_ensembles.model.metrics import gaussian_nll

pytestmark = pytest.mark.unit


def make(seed=0, **kwargs):
    return DeepEnsemble(dim_in=2, num_members=3, hidden_dim=32, seed=seed,
                        use_adversarial_training=True, **kwargs)


def test_training_lowers_the_loss_and_fits_the_data(toy_data, tmp_path):
    X, y = toy_data
    epochs = []
    e = make()
    before = gaussian_nll(e(X).mean, e(X).variance, y)
    Trainer(e, TensorDataset(X, y), train_batch_size=25, train_num_epochs=60, train_lr=1e-2,
            results_folder=tmp_path, metrics_callback=epochs.append).train()
    assert len(epochs) == 60
    assert np.mean(list(epochs[-1]["member_train_loss"].values())) < np.mean(list(epochs[0]["member_train_loss"].values())) - 0.5
    after = e(X)
    assert gaussian_nll(after.mean, after.variance, y) < before - 1.0
    assert (after.mean - y).square().mean().sqrt() < 0.6 * y.std()


def test_checkpoints_land_every_save_every_steps_and_resume_exactly(toy_data, tmp_path):
    X, y = toy_data
    options = dict(train_batch_size=32, train_num_steps=50, train_lr=5e-3, ema_decay=0.9,
                   ema_update_every=2, max_grad_norm=1.0, save_every=20)
    full = make()
    Trainer(full, TensorDataset(X, y), results_folder=tmp_path / "full", **options).train()
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == \
        ["checkpoint-1", "checkpoint-2", "checkpoint-3"]  # steps 20, 40 and the last, 50

    resumed = make()  # a fresh process would build the same object
    trainer = Trainer(resumed, TensorDataset(X, y), results_folder=tmp_path / "full", **options)
    trainer.load(1)
    trainer.train()
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)
    assert trainer.checkpoint_path.name == "checkpoint-3"


def test_predictions_after_training_use_the_ema_weights(toy_data, tmp_path):
    X, y = toy_data
    e = make()
    trainer = Trainer(e, TensorDataset(X, y), train_batch_size=50, train_num_steps=30,
                      ema_decay=0.95, ema_update_every=1, results_folder=tmp_path)
    trainer.train()
    from safetensors.torch import load_file
    member = load_file(trainer.checkpoint_path / "member_000.safetensors")
    torch.testing.assert_close(e.members.weights[0][0], member["model.weights.0"])  # EMA
    assert not torch.allclose(member["model.weights.0"], member["online.weights.0"])
    assert torch.equal(DeepEnsemble.load(trainer.checkpoint_path)(X).mean, e(X).mean)


def test_amp_trains_in_bfloat16_and_trainers_with_other_settings_coexist(toy_data, tmp_path):
    X, y = toy_data
    for amp in (True, False, True):
        e = make()
        Trainer(e, TensorDataset(X, y), train_num_steps=20, amp=amp, results_folder=tmp_path).train()
        assert torch.isfinite(e(X).variance).all()


def test_classifier_trains(tmp_path):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 3
    y = torch.randint(0, 3, (300,), generator=g)
    X = centers[y] + torch.randn(300, 5, generator=g)
    clf = DeepEnsembleClassifier(dim_in=5, num_classes=3, num_members=2, hidden_dim=16, depth=2,
                                 batch_norm=True)
    Trainer(clf, TensorDataset(X, y), train_num_epochs=10, train_lr=1e-2, results_folder=tmp_path).train()
    assert (clf(X).probs.argmax(-1) == y).float().mean() > 0.9


# bad input: every case names the parameter and the value, and writes nothing -------------------

X_OK, Y_OK = torch.randn(20, 2), torch.randn(20, 1)
NAN_X = X_OK.clone(); NAN_X[3, 1] = float("nan")
INF_Y = Y_OK.clone(); INF_Y[0] = float("inf")

BAD_INPUTS = [
    ("num_members < 1", lambda: DeepEnsemble(dim_in=2, num_members=0), ValueError, "'num_members'.*Got 0"),
    ("num_members float", lambda: DeepEnsemble(dim_in=2, num_members=2.5), TypeError, "'num_members'.*2.5"),
    ("hidden_dim < 1", lambda: DeepEnsemble(dim_in=2, hidden_dim=0), ValueError, "'hidden_dim'.*Got 0"),
    ("depth < 1", lambda: DeepEnsemble(dim_in=2, depth=-1), ValueError, "'depth'.*Got -1"),
    ("eps < 0", lambda: DeepEnsemble(dim_in=2, adversarial_eps=-0.01), ValueError, "'adversarial_eps'.*-0.01"),
    ("unknown activation", lambda: DeepEnsemble(dim_in=2, activation="relu6"), ValueError, "'activation'.*relu6"),
    ("num_classes < 2", lambda: DeepEnsembleClassifier(dim_in=2, num_classes=1), ValueError, "'num_classes'.*Got 1"),
    ("X too wide", lambda: make()(torch.randn(4, 3), torch.randn(4, 1)), ValueError, "'X'.*dim_in=2.*\\(4, 3\\)"),
    ("y wrong rows", lambda: make()(torch.randn(4, 2), torch.randn(5, 1)), ValueError, "'y'.*\\(5, 1\\)"),
    ("NaN in X", lambda: TensorDataset(NAN_X, Y_OK), ValueError, "'X'.*NaN.*1 non-finite"),
    ("inf in y", lambda: TensorDataset(X_OK, INF_Y), ValueError, "'y'.*NaN and inf.*1 non-finite"),
    ("labels out of range", lambda: DeepEnsembleClassifier(dim_in=2, num_classes=3)(
        torch.randn(4, 2), torch.tensor([0, 1, 2, 3])), ValueError, "'y'.*\\[0, 3\\).*\\[0, 3\\]"),
    ("string X", lambda: TensorDataset(np.array([["a", "b"]]), np.array([1.0])), TypeError, "'X'.*dtype <U1"),
    ("empty dataset", lambda: TensorDataset(torch.zeros(0, 2), torch.zeros(0, 1)), ValueError, "'X'.*non-empty"),
    ("batch size 0", lambda: Trainer(make(), TensorDataset(X_OK, Y_OK), train_batch_size=0), ValueError,
     "'train_batch_size'.*Got 0"),
    ("lr 0", lambda: Trainer(make(), TensorDataset(X_OK, Y_OK), train_lr=0), ValueError, "'train_lr'.*> 0.0.*Got 0"),
    ("ema_decay 1", lambda: Trainer(make(), TensorDataset(X_OK, Y_OK), ema_decay=1.0), ValueError,
     "'ema_decay'.*\\[0.0, 1.0\\).*Got 1.0"),
    ("dataset of another width", lambda: Trainer(make(), TensorDataset(torch.randn(5, 4), torch.randn(5))),
     ValueError, "'dataset'.*dim_in=2.*Got 4"),
    ("steps and epochs", lambda: Trainer(make(), TensorDataset(X_OK, Y_OK), train_num_steps=5, train_num_epochs=5),
     ValueError, "one of 'train_num_steps' and 'train_num_epochs'"),
    ("cuda_graphs not a bool", lambda: Trainer(make(), TensorDataset(X_OK, Y_OK), cuda_graphs="yes"), TypeError,
     "'cuda_graphs'.*bool.*'yes'"),
    ("results_folder a file", lambda: Trainer(make(), TensorDataset(X_OK, Y_OK), results_folder=__file__),
     ValueError, "'results_folder'.*test_trainer.py', a file"),
    ("metrics_callback not callable", lambda: Trainer(make(), TensorDataset(X_OK, Y_OK), metrics_callback=[]),
     TypeError, "'metrics_callback'.*callable.*\\[\\]"),
    ("meta tensor", lambda: TensorDataset(torch.empty(4, 2, device="meta"), Y_OK[:4]), TypeError,
     "'X'.*holding data.*meta device"),
    ("ragged list", lambda: TensorDataset([[1.0, 2.0], [3.0]], [1.0, 2.0]), TypeError, "'X'.*rectangular"),
    ("repeated feature names", lambda: TensorDataset(X_OK, Y_OK, feature_names=["a", "a"]), ValueError,
     "'feature_names'.*2 distinct names"),
    ("three tensors", lambda: Trainer(make(), torch.utils.data.TensorDataset(X_OK, Y_OK, Y_OK)), ValueError,
     "two tensors, X and y. Got 3"),
    ("coverage a string", lambda: make()(X_OK).interval("0.9"), TypeError, "'coverage'.*real number.*'0.9'"),
    ("coverage a tensor", lambda: make()(X_OK).interval(torch.tensor([0.5, 0.9])), TypeError, "'coverage'.*real number"),
    ("predict batch_size 0", lambda: make().predict(X_OK, batch_size=0), ValueError, "'batch_size'.*>= 1.*Got 0"),
    ("log_prob one target for all rows", lambda: make()(X_OK).log_prob(torch.zeros(1, 1)), ValueError,
     "'y' parameter of log_prob must be \\(20, 1\\).*\\(1, 1\\)"),
    ("log_prob two targets for dim_out 1", lambda: make()(X_OK).log_prob(torch.zeros(20, 2)), ValueError,
     "\\(20, 1\\).*\\(20, 2\\)"),
    ("unknown optimizer", lambda: Trainer(make(), TensorDataset(X_OK, Y_OK), optimizer="rmsprop"), ValueError,
     "'optimizer'.*'adam', 'adamw', 'sgd'.*'rmsprop'"),
    ("momentum 1", lambda: Trainer(make(), TensorDataset(X_OK, Y_OK), optimizer="sgd", momentum=1.0), ValueError,
     "'momentum'.*\\[0.0, 1.0\\).*Got 1.0"),
    ("nesterov with adam", lambda: Trainer(make(), TensorDataset(X_OK, Y_OK), nesterov=True), ValueError,
     "'nesterov'.*optimizer='sgd' with momentum > 0.*True"),
    ("warm-up as long as the run", lambda: Trainer(make(), TensorDataset(X_OK, Y_OK), train_num_steps=10,
                                                   warmup_steps=10), ValueError, "'warmup_steps'.*fewer than the run's 10 steps.*Got 10"),
]


@pytest.mark.parametrize("case, call, error, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_error_and_writes_nothing(case, call, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        call()
    assert list(tmp_path.iterdir()) == []


def test_stacked_adam_is_torch_fused_adam_per_member_and_restarts_one_member_afresh():
    """The loop's Adam calls torch's fused kernel without torch.optim's bookkeeping: bit-identical
    to torch.optim.Adam(fused=True), also when a parameter has no gradient for a step. After
    reset_member(1), member 1 follows a brand-new torch Adam while members 0 and 2 carry on."""
    from ray_ensembles.model.members import StackedMLP
    from ray_ensembles.loop.optim import StackedAdam
    g = torch.Generator().manual_seed(0)
    members = StackedMLP(3, 4, 2, hidden_dim=5, depth=1)
    for i in range(3):
        members.reset_member(i, seed=i)
    params = dict(members.named_parameters())
    theirs = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    adam = StackedAdam(members, 3, lr=1e-2, weight_decay=1e-3)
    reference = torch.optim.Adam(theirs.values(), lr=1e-2, weight_decay=1e-3, fused=True)
    fresh, fresh_adam = None, None
    for step in range(8):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        for named in (params, theirs):
            for k, p in named.items():
                p.grad = None if (k == "biases.0" and step % 3 == 1) else grads[k].clone()
        if fresh is not None:
            for k, p in fresh.items():
                p.grad = theirs[k].grad[1].clone() if theirs[k].grad is not None else None
            fresh_adam.step()
        adam.step()
        reference.step()
        if step == 3:  # restart member 1: from now on it must match a new Adam on its own weights
            adam.reset_member(1)
            fresh = {k: v[1].detach().clone().requires_grad_() for k, v in params.items()}
            fresh_adam = torch.optim.Adam(fresh.values(), lr=1e-2, weight_decay=1e-3, fused=True)
        for k in params:
            for i in (0, 2):
                assert torch.equal(params[k][i], theirs[k][i])
            assert torch.equal(params[k][1], theirs[k][1] if fresh is None else fresh[k])


def test_resuming_a_checkpoint_without_adam_step_counts_is_a_clear_error(toy_data, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from ray_ensembles.loop import checkpoint
    from ray_ensembles.loop.training import EnsembleFit, TrainSettings
    X, y = toy_data
    settings = TrainSettings(batch_size=32, num_steps=10)
    fit = EnsembleFit(make(), TensorDataset(X, y), settings, "cpu")
    fit.run()
    checkpoint.save(fit, tmp_path / "new")
    old = tmp_path / "old"  # member files as written before step counts were saved (no manifest)
    old.mkdir()
    for f in (tmp_path / "new").glob("member_*.safetensors"):
        with safe_open(f, "pt") as member:
            tensors = {k: member.get_tensor(k) for k in member.keys() if not k.startswith("adam.step.")}
            save_file(tensors, old / f.name, metadata=member.metadata())
    with pytest.raises(ValueError, match=r"lacks the optimiser state \['adam.step.\*'\]"):
        checkpoint.restore(EnsembleFit(make(), TensorDataset(X, y), settings, "cpu"), old)
    checkpoint.restore(EnsembleFit(make(), TensorDataset(X, y), settings, "cpu"), tmp_path / "new")


@pytest.mark.parametrize("options, error, message", [
    (dict(lr=0.0), ValueError, r"'train_lr' parameter of Trainer must be a number > 0.0\. Got 0.0"),
    (dict(batch_size=0), ValueError, r"'train_batch_size'.*>= 1\. Got 0"),
    (dict(num_steps=2.5), TypeError, r"'train_num_steps'.*an int"),
    (dict(ema_decay=1.0), ValueError, r"'ema_decay'.*\[0.0, 1.0\)"),
    (dict(max_grad_norm=-1), ValueError, "'max_grad_norm'"),
    (dict(on_divergence="retry"), ValueError, "'on_divergence'"),
    (dict(amp=1), TypeError, "'amp'.*a bool"),
])
def test_train_settings_built_directly_check_themselves_as_the_trainer_does(options, error, message):
    """The benchmarks build the loop's settings without a Trainer: the same checks, the same names."""
    from ray_ensembles.loop.training import TrainSettings
    with pytest.raises(error, match=message):
        TrainSettings(**options)
    assert TrainSettings(lr=1, num_steps=np.int64(5)).lr == 1.0  # normalised to Python's own numbers
    assert type(TrainSettings(num_steps=np.int64(5)).num_steps) is int
