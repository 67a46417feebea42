"""Ray Tune sweeps over M and eps, through the job and the API: the table, ASHA, resume."""

import contextlib
import csv
import io
import math
import re

import pytest

from conftest import shared_local_ray
import torch

from ray_ensembles import DeepEnsemble, TensorDataset
from ray_ensembles.sweep import tune_ensemble

G = torch.Generator().manual_seed(0)
X = torch.randn(200, 3, generator=G)
Y = X[:, :1] * X[:, 1:2] + 0.1 * torch.randn(200, 1, generator=G)


@pytest.fixture(scope="module")
def local_ray():
    shared_local_ray()


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path_factory.mktemp("data") / "t.parquet"
    pq.write_table(pa.table({"a": X[:, 0].numpy(), "b": X[:, 1].numpy(), "c": X[:, 2].numpy(),
                             "y": Y[:, 0].numpy()}), path)
    return path


@pytest.fixture(scope="module")
def sweep(local_ray, table_file, tmp_path_factory):
    import tune_ensemble as job
    out = tmp_path_factory.mktemp("sweep")
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        job.main(["--data", str(table_file), "--target", "y", "--num-members", "1,2",
              "--adversarial-eps", "0,0.01", "--epochs", "4", "--batch-size", "50", "--lr", "0.01",
              "--hidden-dim", "16", "--num-reports", "2", "--cpus-per-worker", "0.25",
              "--name", "grid", "--output", str(out)])
    (out / "console.txt").write_text(console.getvalue())
    return out


@pytest.mark.ray
def test_a_four_trial_sweep_writes_the_table_and_the_best_ensemble(sweep):
    rows = list(csv.DictReader((sweep / "trials.csv").open()))
    assert len(rows) == 4
    assert list(rows[0])[:3] == ["num_members", "adversarial_eps", "val_nll"]
    assert {(r["num_members"], r["adversarial_eps"]) for r in rows} == \
        {("1", "0.0"), ("1", "0.01"), ("2", "0.0"), ("2", "0.01")}
    nll = [float(r["val_nll"]) for r in rows]
    assert nll == sorted(nll) and all(math.isfinite(v) for v in nll)
    assert all(r["training_iteration"] == "2" for r in rows)  # reports at each checkpoint
    assert all(r["training"] == "in_trial" for r in rows)  # CPU trials: no Ray Train run each
    best = DeepEnsemble.load(sweep / "best_ensemble")
    assert best.num_members == int(rows[0]["num_members"])
    assert best.use_adversarial_training == (float(rows[0]["adversarial_eps"]) > 0)
    assert (sweep / "val_nll_vs_m.png").stat().st_size > 5_000


@pytest.mark.ray
def test_the_sweep_prints_one_line_per_finished_trial_and_no_metric_dumps(sweep):
    console = (sweep / "console.txt").read_text()
    done = re.findall(r"^trial (\d)/4 done: num_members=(\d) adversarial_eps=(\S+)  val_nll (\S+)  [\d.]+ s$",
                      console, re.MULTILINE)
    assert sorted(int(n) for n, *_ in done) == [1, 2, 3, 4]
    assert {(m, eps) for _, m, eps, _ in done} == {("1", "0.0"), ("1", "0.01"), ("2", "0.0"), ("2", "0.01")}
    assert "each trial: in its own process, 0.25 CPU (members stacked, no Ray Train run); 8 trials at a time" in console
    assert "Reporting training result" not in console and "metrics={" not in console


@pytest.mark.ray
def test_a_trial_scores_the_same_in_its_own_process_and_on_ray_train(local_ray, tmp_path, capsys):
    # members depend on (seed, member id) alone, so the two ways train the same networks
    def sweep(training):
        return tune_ensemble(TensorDataset(X, Y), {"num_members": [2], "adversarial_eps": [0.01]},
                             storage_path=tmp_path, name=training, trial_training=training,
                             ensemble_options={"hidden_dim": 8}, trainer_options={"train_num_epochs": 3},
                             num_reports=2, progress=True)

    ray_train, in_trial = sweep("ray_train"), sweep("in_trial")
    console = capsys.readouterr().out
    # one CPU per worker: a Ray Train trial's 0.1-CPU driver leaves room for one worker, which stacks both members
    assert "each trial: up to 1 Ray Train worker x 1 CPU (members stacked round-robin) + 0.1 CPU for the " \
           "trial; 1 trial at a time" in console
    assert "each trial: in its own process, 1 CPU (members stacked, no Ray Train run); 2 trials at a time" in console
    [a], [b] = ray_train.table, in_trial.table
    assert (a["training"], b["training"]) == ("ray_train", "in_trial")
    assert a["val_nll"] == pytest.approx(b["val_nll"], rel=1e-6) and a["training_iteration"] == b["training_iteration"] == 2
    assert a["mean_member_val_nll"] == pytest.approx(b["mean_member_val_nll"], rel=1e-6)
    first, second = DeepEnsemble.load(a["ensemble_path"]), DeepEnsemble.load(b["ensemble_path"])
    assert first.num_members == 2 and torch.allclose(first(X).mean, second(X).mean, atol=1e-6)


@pytest.mark.ray
def test_a_finished_sweep_resumes_without_retraining(sweep, table_file):
    runs = sweep / "runs"
    before = {p: p.stat().st_mtime for p in runs.glob("grid/trials/*/ensemble/manifest.json")}
    assert len(before) == 4
    from ray_ensembles.loop.data import read_table, table_to_dataset
    train, validation = table_to_dataset(read_table(str(table_file)), "y").split(0.1, seed=0)
    result = tune_ensemble(train, {"num_members": [1, 2], "adversarial_eps": [0.0, 0.01]},
                           validation_dataset=validation, storage_path=runs, name="grid", resume=True,
                           cpus_per_worker=0.25)
    assert len(result.table) == 4
    assert {p: p.stat().st_mtime for p in before} == before


@pytest.mark.ray
def test_asha_stops_a_poor_trial(local_ray, tmp_path):
    # trials run one at a time, the good one first, so ASHA has a result to compare against
    result = tune_ensemble(TensorDataset(X, Y), {"train_lr": [3e-2, 1e-6]}, scheduler="asha",
                           num_reports=3, max_concurrent=1, storage_path=tmp_path, name="asha",
                           ensemble_options={"num_members": 1, "hidden_dim": 16},
                           trainer_options={"train_num_epochs": 6, "train_batch_size": 40},
                           cpus_per_worker=0.5)
    iterations = {row["train_lr"]: row["training_iteration"] for row in result.table}
    assert iterations[3e-2] == 3 and iterations[1e-6] < 3
    assert result.best_config == {"train_lr": 3e-2}


@pytest.mark.ray
def test_a_trial_larger_than_the_cluster_fails_before_any_trial(local_ray, tmp_path):
    with pytest.raises(ValueError, match=r"largest trial.*needs at least .*'GPU': 1\} \(M=4 on 1 worker.*'GPU': 0"):
        tune_ensemble(TensorDataset(X, Y), {"num_members": [1, 4]}, use_gpu=True, cpus_per_worker=0.25,
                      storage_path=tmp_path, name="big")
    assert not (tmp_path / "big").exists()


@pytest.mark.ray
def test_the_m_curve_mode_trains_one_ensemble_and_scores_its_subsets(local_ray, tmp_path):
    import tune_ensemble as job
    job.main(["--m-curve", "--smoke-test", "--cpus-per-worker", "0.5", "--output", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "m_curve.csv").open()))
    assert [r["num_members"] for r in rows] == ["1", "2"]
    assert float(rows[1]["val_nll_std"]) == 0.0 and float(rows[0]["val_nll_std"]) >= 0.0
    assert DeepEnsemble.load(tmp_path / "best_ensemble").num_members == 2
    assert (tmp_path / "val_nll_vs_m.png").exists()


@pytest.mark.ray
def test_a_hyper_ensemble_selects_members_of_several_configurations_from_a_sweep(local_ray, tmp_path):
    import random

    from ray import tune

    from ray_ensembles.model.selection import mixture_nll
    from ray_ensembles.sweep import hyper_ensemble

    train, validation = TensorDataset(X, Y).split(0.25, seed=0)
    hyper = hyper_ensemble(train, {"hidden_dim": [4, 32], "train_lr": tune.loguniform(1e-3, 3e-2)},
                           validation_dataset=validation, size=3, num_samples=2, seeds_per_config=2,
                           calibrate=True, refit=True, trainer_options={"train_num_epochs": 20, "train_batch_size": 50},
                           cpus_per_worker=0.5, storage_path=tmp_path, name="hyper")
    assert hyper.num_members == 3 and hyper.selection["candidates"] == 8  # 2 widths x 2 draws x 2 seeds
    chosen = hyper.member_configs
    assert all(c["hidden_dim"] == c["hyperparameters"]["hidden_dim"] and 1e-3 <= c["hyperparameters"]["train_lr"] <= 3e-2
               for c in chosen)
    # the selection's NLL on the validation rows beats random choices of 3 of the 8 candidates
    everything = torch.cat([DeepEnsemble.load(p / "ensemble").evaluate_members(validation.X, validation.y)[0]
                            for p in sorted((tmp_path / "hyper" / "trials").iterdir())])
    rng = random.Random(0)
    assert hyper.selection["val_nll"] < sum(mixture_nll(everything, rng.sample(range(8), 3)) for _ in range(50)) / 50
    assert hyper.selection["calibrated_val_nll"] <= hyper.selection["val_nll"] + 1e-9
    # refit: the chosen members trained again on all the rows, validation rows included
    everything = torch.cat([train.X, validation.X]).double()
    torch.testing.assert_close(hyper.standardizer.x_mean, everything.mean(0), rtol=1e-9, atol=1e-12)
    hyper.save(tmp_path / "chosen")
    loaded = DeepEnsemble.load(tmp_path / "chosen")
    assert loaded.member_configs == chosen and torch.equal(loaded(X).variance, hyper(X).variance)


@pytest.mark.unit
@pytest.mark.parametrize("space, options, message", [
    ({}, {}, "non-empty dict"),
    ({"hidden_dim": [8]}, {"size": 0}, "'size' parameter of hyper_ensemble must be an int >= 1"),
    ({"hidden_dim": [8, 16]}, {"size": 5, "replacement": False, "num_samples": 1, "seeds_per_config": 2},
     "at most the 4 members"),
    ({"num_members": [1, 2]}, {}, "must not set num_members"),
    ({"widht": [8]}, {}, "unknown option 'widht'"),
])
def test_hyper_ensemble_refuses_bad_input_before_any_trial(space, options, message, tmp_path):
    from ray_ensembles.sweep import hyper_ensemble

    with pytest.raises(ValueError, match=message):
        hyper_ensemble(TensorDataset(X, Y), space, storage_path=tmp_path, **options)
    assert not any(tmp_path.iterdir())
