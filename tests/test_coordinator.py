"""The coordinator and member placement, without starting Ray."""

import os

import pytest
import torch
from ray.train import ScalingConfig

from ray_ensembles import DeepEnsemble, TensorDataset, Trainer
from ray_ensembles.loop import checkpoint
from ray_ensembles.io import storage
from ray_ensembles.on_ray.distributed import POLL_ENV, env_default
from ray_ensembles.loop.placement import assign_members
from ray_ensembles.io.storage import load_members as assemble  # the coordinator's assembly
from ray_ensembles.loop.training import EnsembleFit, TrainSettings

pytestmark = pytest.mark.unit

X, Y = torch.randn(60, 2), torch.randn(60, 1)


def test_members_are_spread_round_robin_and_disjointly():
    assert assign_members([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert assign_members([0, 1, 2], 3) == [[0], [1], [2]]
    assert assign_members([5, 7], 1) == [[5, 7]]


def worker_checkpoint(directory, member_ids, steps=4, **ensemble_kwargs):
    """What one worker writes into a Ray checkpoint."""
    kwargs = dict(dim_in=2, hidden_dim=8, seed=1, **ensemble_kwargs)
    e = DeepEnsemble(num_members=len(member_ids), member_ids=member_ids, **kwargs)
    fit = EnsembleFit(e, TensorDataset(X, Y), TrainSettings(batch_size=20, num_steps=steps), "cpu")
    fit.run()
    for m, (tensors, meta) in checkpoint.member_files(fit).items():
        storage.write_member_file(directory, m, tensors, meta)
    return e


def test_assembles_every_member_from_the_workers_files(tmp_path):
    a = worker_checkpoint(tmp_path, [0, 2])
    b = worker_checkpoint(tmp_path, [1])
    target = DeepEnsemble(dim_in=2, num_members=3, hidden_dim=8, seed=1)
    metadata = assemble(tmp_path, target)
    assert sorted(metadata) == [0, 1, 2] and all("train_loss" in m for m in metadata.values())
    torch.testing.assert_close(target.members.member_state(2), a.members.member_state(1))
    torch.testing.assert_close(target.members.member_state(1), b.members.member_state(0))


def test_a_missing_member_is_named(tmp_path):
    worker_checkpoint(tmp_path, [0, 2])
    with pytest.raises(ValueError, match=r"lacks members \[1\] of \[0, 1, 2\]"):
        assemble(tmp_path, DeepEnsemble(dim_in=2, num_members=3, hidden_dim=8, seed=1))


def test_a_member_of_another_configuration_is_refused(tmp_path):
    worker_checkpoint(tmp_path, [0])
    worker_checkpoint(tmp_path, [1], adversarial_eps=0.5)
    with pytest.raises(ValueError, match="belongs to another ensemble"):
        assemble(tmp_path, DeepEnsemble(dim_in=2, num_members=2, hidden_dim=8, seed=1))


def test_members_from_different_steps_are_refused(tmp_path):
    worker_checkpoint(tmp_path, [0], steps=4)
    worker_checkpoint(tmp_path, [1], steps=6)
    with pytest.raises(ValueError, match=r"mixes members from steps \[4, 6\]"):
        assemble(tmp_path, DeepEnsemble(dim_in=2, num_members=2, hidden_dim=8, seed=1))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(scaling_config=ScalingConfig(num_workers=4)), ValueError, r"'num_workers'.*\[1, num_members=3\].*Got 4"),
    (dict(scaling_config={"num_workers": 2}), TypeError, "'scaling_config'.*ScalingConfig.*dict"),
    (dict(scaling_config=ScalingConfig(num_workers=2), run_config={"name": "x"}), TypeError, "'run_config'"),
])
def test_bad_ray_requests_fail_before_ray_starts(kwargs, error, message, tmp_path, ray_must_not_start):
    with pytest.raises(error, match=message):
        Trainer(DeepEnsemble(dim_in=2, num_members=3), TensorDataset(X, Y), results_folder=tmp_path, **kwargs)


def test_the_faster_controller_poll_is_set_for_the_fit_only_and_never_over_the_users(monkeypatch):
    monkeypatch.delenv(POLL_ENV, raising=False)
    with env_default(POLL_ENV, "0.2"):
        assert os.environ[POLL_ENV] == "0.2"
    assert POLL_ENV not in os.environ
    monkeypatch.setenv(POLL_ENV, "5")
    with env_default(POLL_ENV, "0.2"):
        assert os.environ[POLL_ENV] == "5"
    assert os.environ[POLL_ENV] == "5"
