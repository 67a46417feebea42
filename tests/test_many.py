"""fit_many and EnsemblePool: many ensembles on long-lived Ray actors, each the ensemble the
in-process Trainer trains; bad input refused before anything starts; a killed actor's ensemble
retried to the same result; saving each."""

import os
import signal
import threading
import time

import pytest
import torch

from conftest import shared_local_ray
from ray_ensembles import DeepEnsemble, EnsemblePool, FitResult, TensorDataset, Trainer, fit_many, iter_fit_many

G = torch.Generator().manual_seed(0)
X = torch.randn(200, 3, generator=G)
Y = X[:, :1] * X[:, 1:2] + 0.1 * torch.randn(200, 1, generator=G)
OPTIONS = {"train_num_epochs": 5, "train_batch_size": 50, "train_lr": 0.01}


def job(seed, rows=200, members=3):
    return DeepEnsemble(3, 1, num_members=members, hidden_dim=16, seed=seed), TensorDataset(X[:rows], Y[:rows])


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# Checked before anything starts --------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("ensembles, options, message", [
    ({}, {}, "non-empty dict"),
    ({"north": job(0), "south": (DeepEnsemble(4, 1), TensorDataset(X, Y))}, {}, r"ensemble 'south'.*dim_in=4"),
    ({"north": job(0), ("south", 2): {"ensemble": job(1)[0], "dataset": job(1)[1], "train_lr": -1.0}}, {},
     r"ensemble \('south', 2\).*'train_lr'.*Got -1.0"),
    ({"north": job(0)}, {"train_num_epochs": 0}, r"ensemble 'north'.*'train_num_epochs'"),
    ({"north": {"ensemble": job(0)[0]}}, {}, r"ensemble 'north'.*needs 'ensemble' and 'dataset'"),
    ({"north": job(0)}, {"results_folder": "x"}, r"ensemble 'north'.*except .*'results_folder'"),
    ({"north": job(0)}, {"max_retries": -1}, r"'max_retries'.*Got -1"),
])
def test_bad_input_names_its_ensemble_before_ray_starts(ensembles, options, message, ray_must_not_start):
    with pytest.raises((ValueError, TypeError), match=message):
        iter_fit_many(ensembles, **options)


@pytest.mark.unit
def test_save_names_must_be_folder_names(tmp_path):
    with pytest.raises(ValueError, match=r"ensemble 'a/b' .* saves under storage_path as 'a/b'"):
        fit_many({"a/b": job(0)}, storage_path=tmp_path)
    with pytest.raises(ValueError, match=r"ensemble \('a', 1\) .* as 'a-1'"):
        fit_many({("a", 1): job(0), "a-1": job(1)}, storage_path=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_a_save_folder_holding_other_files_is_refused_before_any_ensemble_trains(tmp_path, ray_must_not_start):
    (tmp_path / "k1").mkdir()
    (tmp_path / "k1" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"ensemble 'k1' .* cannot be saved.*not an ensemble"):
        fit_many({"k0": job(0), "k1": job(1)}, storage_path=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1"]
    assert [p.name for p in (tmp_path / "k1").iterdir()] == ["notes.txt"]


# On a pool of two actors ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool():
    shared_local_ray()
    with EnsemblePool() as pool:
        yield pool


@pytest.mark.ray
def test_each_result_is_the_ensemble_the_in_process_trainer_trains(pool, tmp_path):
    validation = TensorDataset(X[:40] + 0.1, Y[:40])
    ensembles = {seed: job(seed) for seed in (3, 1, 2)}
    results = pool.fit_many({k: (*v, validation) for k, v in ensembles.items()}, **OPTIONS)
    assert list(results) == [3, 1, 2] and pool.num_workers == 2
    for seed, (ensemble, data) in ensembles.items():
        untouched = DeepEnsemble(3, 1, num_members=3, hidden_dim=16, seed=seed)
        assert same_weights(ensemble, untouched)  # the ensembles passed in are left as they were
        trainer = Trainer(ensemble, data, validation_dataset=validation, **OPTIONS, results_folder=tmp_path / str(seed))
        trainer.train()
        result = results[seed]
        assert isinstance(result, FitResult) and result.attempts == 1 and result.path is None
        assert same_weights(result.ensemble, trainer.ensemble)
        assert result.metrics == trainer.metrics and result.history == trainer.history
        losses = [entry["member_train_loss"][0] for entry in result.history]
        assert losses[-1] < losses[0]
    assert not same_weights(results[1].ensemble, results[2].ensemble)


@pytest.mark.ray
def test_results_stream_in_the_order_they_finish(pool):
    slow = {"ensemble": job(0)[0], "dataset": job(0)[1], "train_num_steps": 1500}
    order = [r.key for r in iter_fit_many({"slow": slow, "a": job(1, rows=50), "b": job(2, rows=50)},
                                          pool=pool, **OPTIONS)]
    assert order[-1] == "slow" and sorted(order) == ["a", "b", "slow"]


@pytest.mark.ray
def test_a_killed_workers_ensemble_is_retried_on_another_and_ends_identical(pool):
    spec = {"long": {"ensemble": job(5)[0], "dataset": job(5)[1], "train_num_steps": 3000}}
    reference = pool.fit_many(spec, **OPTIONS)["long"]
    pids = {actor: pool_pid(actor) for actor in pool.actors}
    victim = pool.actors[-1]  # the next idle actor, which takes the first ensemble
    killer = threading.Timer(1.0, os.kill, (pids[victim], signal.SIGKILL))
    killer.start()
    started = time.monotonic()
    result = pool.fit_many(spec, **OPTIONS)["long"]
    killer.join()
    assert time.monotonic() - started > 1.0  # it was killed mid-ensemble, not after
    assert result.attempts == 2 and same_weights(result.ensemble, reference.ensemble)
    assert result.metrics == reference.metrics
    assert victim not in pool.actors and len(pool.actors) == 2  # replaced
    assert len({pool_pid(actor) for actor in pool.actors} - set(pids.values())) == 1


def pool_pid(actor) -> int:
    import ray
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


@pytest.mark.ray
def test_each_ensemble_is_saved_under_its_key(pool, tmp_path):
    results = fit_many({("north", 0): job(0), ("south", 1): job(1)}, pool=pool, storage_path=tmp_path, **OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["north-0", "south-1"]
    for key, result in results.items():
        assert result.path == str(tmp_path / f"{key[0]}-{key[1]}")
        loaded = DeepEnsemble.load(result.path)
        assert torch.equal(loaded(X).mean, result.ensemble(X).mean)


@pytest.mark.ray
def test_a_failing_ensemble_names_its_key(pool):
    broken, data = job(0)
    with torch.no_grad():
        broken.members.biases[-1][1].fill_(float("inf"))
    with pytest.raises(RuntimeError, match="The ensemble 'bad' of fit_many failed: Member 1 diverged at step 0"):
        pool.fit_many({"good": job(1), "bad": (broken, data)}, **OPTIONS)
    assert pool.fit_many({"again": job(2, rows=50)}, **OPTIONS)["again"].attempts == 1  # the pool still works
