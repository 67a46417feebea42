"""Members on Ray Train workers: placement invariance (image members with augmentation and SGD),
fault resume, resource checks."""

import json

import pytest
import ray
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig

from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, TensorDataset, Trainer
import fault_injection  # tests/, on the path under pytest
import launched_train
from conftest import own_local_ray
# the placement tests' workload (image members, augmentation, SGD) is the torchrun test's
from launched_train import OPTIONS, X, Y, ensemble

pytestmark = pytest.mark.ray

G = torch.Generator().manual_seed(0)
TABLE_X = torch.randn(150, 3, generator=G)
TABLE_Y = TABLE_X[:, :1] * TABLE_X[:, 1:2] + 0.1 * torch.randn(150, 1, generator=G)


@pytest.fixture(scope="module", autouse=True)
def local_ray(tmp_path_factory, monkeypatch_module):
    fault_file = tmp_path_factory.mktemp("fault") / "fault.json"  # armed by the killed-worker test
    monkeypatch_module.setenv(fault_injection.FAULT_FILE_ENV, str(fault_file))
    for module in (fault_injection, launched_train):  # workers cannot import tests/
        ray.cloudpickle.register_pickle_by_value(module)
    own_local_ray(runtime_env={"worker_process_setup_hook": fault_injection.install})
    yield fault_file
    ray.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def train(tmp_path, workers=None, name=None):
    e = ensemble()
    sc = None if workers is None else ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5})
    rc = None if name is None else RunConfig(name=name, storage_path=str(tmp_path / "runs"),
                                             failure_config=FailureConfig(max_failures=1))
    trainer = Trainer(e, TensorDataset(X, Y), results_folder=tmp_path / "in-process", scaling_config=sc,
                      run_config=rc, **OPTIONS)
    trainer.train()
    return e, trainer


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    return train(tmp_path_factory.mktemp("base"))


def assert_same_ensemble(a, b):
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_a_loaded_checkpoint_resumes_on_one_worker_holding_every_member(in_process, tmp_path):
    base, base_trainer = in_process
    e = ensemble()
    trainer = Trainer(e, TensorDataset(X, Y), results_folder=base_trainer.results_folder,
                      scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                      run_config=RunConfig(storage_path=str(tmp_path / "runs")), **OPTIONS)
    trainer.load(1)  # step 10 of an in-process run; before, the workers trained from scratch
    trainer.train()
    assert_same_ensemble(base, e)  # resumed, and the same members stacked on one worker
    assert [h["step"] for h in trainer.history] == [h["step"] for h in base_trainer.history if h["step"] > 10]
    node = ray.get_runtime_context().get_node_id()
    assert trainer.placement == {m: {"rank": 0, "node_id": node, "device": "cpu", "gpu_ids": []} for m in range(3)}


def test_two_workers_with_one_killed_mid_run_train_the_in_process_ensemble(in_process, tmp_path, local_ray):
    """Members go round-robin to the workers (two stacked on one), a worker killed after its step-10
    checkpoint resumes from it, and the members, metrics and history are the in-process run's."""
    base, base_trainer = in_process
    marker = tmp_path / "crashed"
    local_ray.write_text(json.dumps({"rank": 0, "after_step": 10, "marker": str(marker)}))
    try:
        e, trainer = train(tmp_path, workers=2, name="killed")
    finally:
        local_ray.unlink()
    assert marker.exists()  # the worker process really died once
    assert_same_ensemble(base, e)
    assert trainer.metrics["val_nll"] == pytest.approx(base_trainer.metrics["val_nll"], rel=1e-5)
    assert set(trainer.metrics["members"]) == {0, 1, 2}
    node = ray.get_runtime_context().get_node_id()
    assert trainer.placement == {m: {"rank": m % 2, "node_id": node, "device": "cpu", "gpu_ids": []} for m in range(3)}
    # the same history, with validation at the checkpoints, reaches the driver
    assert [h["step"] for h in trainer.history] == [h["step"] for h in base_trainer.history]
    assert trainer.history[-1]["val_nll"] == pytest.approx(base_trainer.history[-1]["val_nll"], rel=1e-5)
    loaded = DeepEnsemble.load(trainer.checkpoint_path, member_factory=launched_train.small_cnn)
    torch.testing.assert_close(loaded(X).mean, e(X).mean)


def test_a_streamed_table_trains_the_same_members_on_two_workers_after_one_is_killed_mid_epoch(tmp_path, local_ray):
    """Every worker reads the whole Ray Dataset; a worker killed at step 10 (of the one epoch's 19,
    in its third window of five) resumes there, and the members are those of one uninterrupted process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = torch.randn(600, 4, generator=torch.Generator().manual_seed(5))
    table = pa.table({"a": rows[:, 0].numpy(), "b": rows[:, 1].numpy(), "c": rows[:, 2].numpy(),
                      "y": (rows[:, 0] * rows[:, 1] + 0.1 * rows[:, 3]).numpy()})
    (tmp_path / "table").mkdir()
    for k in range(3):
        pq.write_table(table.slice(200 * k, 200), tmp_path / "table" / f"part-{k}.parquet")
    options = dict(target="y", train_batch_size=32, train_num_epochs=1, train_lr=3e-3, save_every=10,
                   shuffle_buffer_rows=128, results_folder=tmp_path / "in-process")

    def fit(**more):
        e = DeepEnsemble(dim_in=3, num_members=3, hidden_dim=16, seed=4)
        trainer = Trainer(e, ray.data.read_parquet(str(tmp_path / "table")), **options, **more)
        trainer.train()
        return e, trainer

    base, _ = fit()
    marker = tmp_path / "crashed"
    local_ray.write_text(json.dumps({"rank": 0, "after_step": 10, "marker": str(marker)}))
    try:
        e, trainer = fit(scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                         run_config=RunConfig(name="streamed", storage_path=str(tmp_path / "runs"),
                                              failure_config=FailureConfig(max_failures=1)))
    finally:
        local_ray.unlink()
    assert marker.exists()  # the worker process really died once
    assert_same_ensemble(base, e)
    assert {m: p["rank"] for m, p in trainer.placement.items()} == {0: 0, 1: 1, 2: 0}


def test_a_request_larger_than_the_cluster_fails_at_once_naming_both_numbers(tmp_path):
    trainer = Trainer(ensemble(), TensorDataset(X, Y), results_folder=tmp_path,
                      scaling_config=ScalingConfig(num_workers=2, use_gpu=True))
    with pytest.raises(ValueError, match=r"asks for 2 GPU \(2 workers x 1\) but the Ray cluster has 0 GPU"):
        trainer.train()
    trainer = Trainer(ensemble(), TensorDataset(X, Y), results_folder=tmp_path,
                      scaling_config=ScalingConfig(num_workers=3))  # 3 CPUs on a 2-CPU cluster
    with pytest.raises(ValueError, match=r"asks for 3 CPU .* has 2 CPU"):
        trainer.train()
    assert not any(tmp_path.iterdir())


def test_classifier_members_train_on_workers(tmp_path):
    centers = torch.randn(3, 3, generator=G) * 3  # a table, beside the image workload
    labels = torch.randint(0, 3, (150,), generator=G)
    points = centers[labels] + torch.randn(150, 3, generator=G)
    clf = DeepEnsembleClassifier(dim_in=3, num_classes=3, num_members=2, hidden_dim=16, depth=2,
                                 batch_norm=True)
    trainer = Trainer(clf, TensorDataset(points, labels), train_num_epochs=8, train_lr=1e-2,
                      results_folder=tmp_path,
                      validation_dataset=TensorDataset(points[:50], labels[:50]),
                      scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}))
    trainer.train()
    assert trainer.metrics["val_accuracy"] > 0.85
    assert DeepEnsembleClassifier.load(trainer.checkpoint_path).member_ids == [0, 1]


def test_the_driver_gets_live_progress_and_every_entry_in_order(tmp_path, monkeypatch):
    from ray_ensembles.loop.progress import EnsembleProgress

    class Recorder:
        def __init__(self):
            self.calls = []

        def start(self, params):
            self.calls.append(("start", params["num_workers"]))

        def log_epoch(self, entry):
            self.calls.append(("epoch", entry["step"]))

        def finish(self, metrics, path):
            self.calls.append(("finish", path))

    seen, entries, recorder = [], [], Recorder()
    monkeypatch.setattr(EnsembleProgress, "update", lambda self, done, *rest: seen.append(done))
    steps = 8000  # 2 members, one per worker: several seconds, so several of the workers' messages
    trainer = Trainer(DeepEnsemble(dim_in=3, num_members=2, hidden_dim=8, seed=1), TensorDataset(TABLE_X, TABLE_Y),
                      train_batch_size=10, train_num_steps=steps, save_every=steps // 2, progress=True,
                      validation_dataset=TensorDataset(TABLE_X[:40], TABLE_Y[:40]), metrics_callback=entries.append, loggers=[recorder],
                      results_folder=tmp_path,
                      scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}))
    trainer.train()
    assert seen == sorted(seen) and seen[-1] == 2 * steps
    assert any(0 < done < 2 * steps for done in seen), seen  # it moved while training ran
    # the callback and the loggers run in the driver: they see the whole history, in order
    assert entries == trainer.history and len(entries) == steps // 15 + 2  # 533 epochs, 2 mid-epoch checkpoints
    assert recorder.calls == [("start", 2), *[("epoch", h["step"]) for h in trainer.history],
                              ("finish", trainer.checkpoint_path)]
    assert [h["step"] for h in trainer.history if "val_nll" in h] == [steps // 2, steps]
