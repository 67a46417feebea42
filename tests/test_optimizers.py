"""The loop's optimisers (Adam, AdamW, SGD with momentum and Nesterov) are torch's, one per
member over the stack; the warm-up and cosine schedule; a run with each resumes exactly."""

import math

import pytest
import torch

from ray_ensembles import DeepEnsemble, TensorDataset, Trainer
from ray_ensembles.loop.optim import StackedAdam, StackedSGD
from ray_ensembles.loop.training import TrainSettings
from ray_ensembles.model.members import StackedMLP

pytestmark = pytest.mark.unit

TORCH = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
         "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, weight_decay=1e-3, momentum=0.9, fused=True),
         "nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-2, weight_decay=1e-3, momentum=0.9, nesterov=True, fused=True),
         "sgd, no momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.0, fused=True)}
OURS = {"adamw": lambda m: StackedAdam(m, 3, lr=1e-2, weight_decay=0.1, decoupled=True),
        "sgd": lambda m: StackedSGD(m, lr=1e-2, weight_decay=1e-3, momentum=0.9),
        "nesterov": lambda m: StackedSGD(m, lr=1e-2, weight_decay=1e-3, momentum=0.9, nesterov=True),
        "sgd, no momentum": lambda m: StackedSGD(m, lr=1e-2, weight_decay=0.0, momentum=0.0)}


@pytest.mark.parametrize("kind", list(OURS))
def test_each_member_follows_torchs_own_optimizer_and_a_restarted_member_a_fresh_one(kind):
    g = torch.Generator().manual_seed(0)
    members = StackedMLP(3, 4, 2, hidden_dim=5, depth=1)
    for i in range(3):
        members.reset_member(i, seed=i)
    params = dict(members.named_parameters())
    theirs = [{k: v[i].detach().clone().requires_grad_() for k, v in params.items()} for i in range(3)]
    ours, reference = OURS[kind](members), [TORCH[kind](list(t.values())) for t in theirs]
    for step in range(8):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        for k, p in params.items():
            p.grad = grads[k].clone()
            for i in range(3):
                theirs[i][k].grad = grads[k][i].clone()
        ours.step()
        for opt in reference:
            opt.step()
        if step == 3:  # member 1 restarts: a new optimiser on its current weights
            ours.reset_member(1)
            reference[1] = TORCH[kind](list(theirs[1].values()))
        for k in params:
            for i in range(3):
                torch.testing.assert_close(params[k][i], theirs[i][k], rtol=1e-6, atol=1e-7)


def test_the_warm_up_rises_linearly_then_the_cosine_runs_over_the_rest():
    plain = TrainSettings(lr=0.1, num_steps=100)
    assert [plain.lr_at(s) for s in (0, 50)] == [0.1, 0.1 * 0.5 * (1 + math.cos(math.pi * 0.5))]  # as before
    warm = TrainSettings(lr=0.1, num_steps=100, warmup_steps=10)
    assert [round(warm.lr_at(s), 12) for s in (0, 4, 9)] == [0.01, 0.05, 0.1]
    assert warm.lr_at(10) == 0.1 and warm.lr_at(55) == pytest.approx(0.05) and warm.lr_at(99) < 1e-3
    flat = TrainSettings(lr=0.1, num_steps=100, warmup_steps=10, lr_scheduler=False)
    assert flat.lr_at(4) == pytest.approx(0.05) and flat.lr_at(50) == 0.1


@pytest.mark.parametrize("optimizer, extra", [("sgd", {"nesterov": True}), ("adamw", {"weight_decay": 0.01})])
def test_a_run_with_each_optimizer_learns_and_resumes_exactly(optimizer, extra, toy_data, tmp_path):
    X, y = toy_data
    options = dict(train_batch_size=25, train_num_steps=120, train_lr=1e-2, save_every=40, optimizer=optimizer,
                   warmup_steps=20, **extra)

    def ensemble():
        return DeepEnsemble(dim_in=2, num_members=3, hidden_dim=16, seed=1)

    whole = Trainer(ensemble(), TensorDataset(X, y), results_folder=tmp_path / "whole", **options)
    whole.train()
    losses = [sum(e["member_train_loss"].values()) for e in whole.history]
    assert losses[-1] < losses[0] - 0.5
    resumed = Trainer(ensemble(), TensorDataset(X, y), results_folder=tmp_path / "whole", **options)
    resumed.load(2)  # step 80 of the same run: the optimiser's state comes back with the weights
    resumed.train()
    x = torch.randn(16, 2)
    torch.testing.assert_close(resumed.ensemble(x).mean, whole.ensemble(x).mean, rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_member_trained_alone_equals_the_same_member_in_an_ensemble(optimizer, toy_data, tmp_path):
    X, y = toy_data

    def trained(**kwargs):
        e = DeepEnsemble(dim_in=2, hidden_dim=16, seed=11, use_adversarial_training=True, **kwargs)
        Trainer(e, TensorDataset(X, y), train_batch_size=32, train_num_steps=40, train_lr=3e-3, optimizer=optimizer,
                nesterov=optimizer == "sgd", weight_decay=1e-3, warmup_steps=5, max_grad_norm=0.5,
                results_folder=tmp_path / f"{optimizer}-{e.member_ids}").train()
        return e

    together, alone = trained(num_members=3), trained(num_members=1, member_ids=[2])
    for k, v in alone.members.member_state(0).items():
        torch.testing.assert_close(together.members.member_state(2)[k], v, atol=1e-5, rtol=1e-4, msg=k)
