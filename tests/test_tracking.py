"""The progress bar and experiment tracking of the in-process Trainer: MLflow (a file store, read
back) and TensorBoard event files (parsed back)."""

import struct

import pytest

from ray_ensembles import DeepEnsemble, TensorDataset, Trainer
from ray_ensembles.loop.progress import EnsembleProgress
from ray_ensembles.io.tracking import MLflowLogger, TensorBoardLogger

pytestmark = pytest.mark.unit


def events(log_dir):
    """Every scalar (tag, step, value) and text tag in a folder of TensorBoard event files."""
    from tensorboardX.proto.event_pb2 import Event

    scalars, texts = [], set()
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecord: length (8), its CRC (4), the record, its CRC (4)
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.append((value.tag, event.step, value.simple_value))
                else:
                    texts.add(value.tag.split("/")[0])
    return scalars, texts


@pytest.fixture
def trained(toy_data, tmp_path):
    X, y = toy_data
    mlflow = MLflowLogger(tmp_path / "mlruns", experiment_name="toy", run_name="first")
    board = TensorBoardLogger(tmp_path / "tb")
    trainer = Trainer(DeepEnsemble(dim_in=2, num_members=2, hidden_dim=16), TensorDataset(X[:150], y[:150]),
                      train_batch_size=50, train_num_epochs=8, train_lr=1e-2, save_every=6,
                      validation_dataset=TensorDataset(X[150:], y[150:]), results_folder=tmp_path / "results",
                      loggers=[mlflow, board])
    trainer.train()
    return trainer, mlflow, tmp_path


def test_the_mlflow_store_holds_the_runs_parameters_metrics_and_ensemble(trained):
    from mlflow.tracking import MlflowClient

    trainer, logger, tmp_path = trained
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["num_members"] == "2"
    assert run.data.params["ensemble.hidden_dim"] == "16"
    assert run.data.tags["ensemble_path"] == str(trainer.checkpoint_path)
    # every epoch's mean training loss at its step; validation at the checkpoints (every 6 steps)
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in loss] == [h["step"] for h in trainer.history if "epoch" in h]
    assert loss[-1].value < loss[0].value
    val = client.get_metric_history(run.info.run_id, "val_nll")
    validated = [h for h in trainer.history if "val_nll" in h]
    assert [m.step for m in val] == [h["step"] for h in validated]
    assert [m.value for m in val] == pytest.approx([h["val_nll"] for h in validated])
    assert [m.step for m in val] == [6, 12, 18, 24]
    assert len(client.get_metric_history(run.info.run_id, "member_1/train_loss")) == 8
    assert client.get_metric_history(run.info.run_id, "final/val_nll")[0].value == pytest.approx(trainer.metrics["val_nll"])


def test_tensorboard_event_files_hold_every_scalar_at_its_step(trained):
    trainer, _, tmp_path = trained
    scalars, texts = events(tmp_path / "tb")
    by_tag = {}
    for tag, step, value in scalars:
        by_tag.setdefault(tag, []).append((step, value))
    assert [s for s, _ in by_tag["train_loss"]] == [h["step"] for h in trainer.history if "epoch" in h]
    validated = [h for h in trainer.history if "val_nll" in h]
    assert [s for s, _ in by_tag["val_nll"]] == [h["step"] for h in validated]
    assert [v for _, v in by_tag["val_nll"]] == pytest.approx([h["val_nll"] for h in validated], rel=1e-6)
    assert {"member_0/train_loss", "member_1/val_nll", "val_rmse"} <= set(by_tag)
    assert {"config", "ensemble_path"} <= texts


def test_the_bar_counts_member_steps_up_to_the_whole_ensemble(toy_data, tmp_path, monkeypatch):
    X, y = toy_data
    seen = []
    monkeypatch.setattr(EnsembleProgress, "update", lambda self, done, loss=None, val=None: seen.append((done, loss)))
    monkeypatch.setattr("ray_ensembles.loop.in_process.Every", lambda seconds: lambda: True)  # every step, not every 0.5 s
    Trainer(DeepEnsemble(dim_in=2, num_members=3, hidden_dim=8), TensorDataset(X, y), train_batch_size=50,
            train_num_steps=12, results_folder=tmp_path, progress=True).train()
    assert [done for done, _ in seen] == [3 * step for step in range(1, 13)]
    assert all(isinstance(loss, float) for _, loss in seen)


def test_a_logger_without_the_three_methods_is_refused_at_construction(toy_data):
    X, y = toy_data
    with pytest.raises(TypeError, match="'loggers' parameter of Trainer must hold objects with start"):
        Trainer(DeepEnsemble(dim_in=2), TensorDataset(X, y), loggers=[print])


@pytest.mark.parametrize("make, message", [
    (lambda tmp: MLflowLogger("foo://nowhere"), r"'tracking_uri' parameter of MLflowLogger .* Got 'foo://nowhere'"),
    (lambda tmp: TensorBoardLogger(tmp / "a-file"), r"'log_dir' parameter of TensorBoardLogger .*a file"),
    (lambda tmp: TensorBoardLogger(tmp / "a-file" / "tb"), r"'log_dir' parameter of TensorBoardLogger .*a file"),
])
def test_a_tracker_that_cannot_record_is_refused_at_construction(toy_data, tmp_path, make, message):
    X, y = toy_data
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ValueError, match=message):
        Trainer(DeepEnsemble(dim_in=2, num_members=2, hidden_dim=16), TensorDataset(X, y),
                results_folder=tmp_path / "results", loggers=[make(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
