"""jobs/predict.py and the batch predictor: round trip, streaming, feature names, errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import predict as job
from conftest import REPO
from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, TensorDataset, Trainer

G = torch.Generator().manual_seed(0)
X = torch.randn(1000, 3, generator=G) * torch.tensor([1.0, 10.0, 100.0])
Y = X[:, :1] + X[:, 1:2] / 10 + 0.1 * torch.randn(1000, 1, generator=G)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    e = DeepEnsemble(dim_in=3, num_members=3, hidden_dim=16, seed=0)
    Trainer(e, TensorDataset(X, Y, feature_names=["a", "b", "c"]), train_num_epochs=3,
            results_folder=root / "r").train()
    e.save(root / "ensemble")
    # columns in another order, plus an id and an unrelated column
    pq.write_table(pa.table({"id": np.arange(1000), "c": X[:, 2].numpy(), "note": ["x"] * 1000,
                             "b": X[:, 1].numpy(), "a": X[:, 0].numpy()}), root / "in.parquet")
    return e, root


def run(root, *extra):
    out = root / f"out-{len(list(root.iterdir()))}"
    job.main(["--ensemble", str(root / "ensemble"), "--data", str(root / "in.parquet"),
              "--output", str(out), *extra])
    return out


def test_the_output_equals_the_ensembles_prediction_with_keys_kept(saved):
    e, root = saved
    out = pq.read_table(run(root)).to_pandas()
    pred = e(X)
    assert list(out.columns) == ["id", "note", "mean", "variance", "aleatoric", "epistemic", "lower_0.9", "upper_0.9"]
    assert (out["id"].to_numpy() == np.arange(1000)).all()
    np.testing.assert_allclose(out["mean"], pred.mean[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["variance"], pred.variance[:, 0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(out["aleatoric"] + out["epistemic"], out["variance"], rtol=1e-5)
    lo, hi = pred.interval(0.9)
    np.testing.assert_allclose(out["upper_0.9"], hi[:, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_it_streams_in_bounded_batches(saved):
    e, root = saved
    out = run(root, "--batch-size", "128")
    parquet = pq.ParquetFile(next(out.glob("*.parquet")))
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert len(sizes) == 8 and max(sizes) == 128 and sum(sizes) == 1000
    np.testing.assert_allclose(parquet.read().column("mean").to_numpy(), e(X).mean[:, 0].numpy(), rtol=1e-5, atol=1e-5)


def write_row_groups(path, table, rows_per_group):
    with pq.ParquetWriter(path, table.schema) as writer:
        for start in range(0, table.num_rows, rows_per_group):
            writer.write_table(table.slice(start, rows_per_group))


def test_row_groups_are_predicted_in_parallel_into_files_in_input_order(saved, tmp_path):
    e, root = saved
    write_row_groups(tmp_path / "in.parquet", pq.read_table(root / "in.parquet"), 150)
    out = tmp_path / "out"
    job.main(["--ensemble", str(root / "ensemble"), "--data", str(tmp_path / "in.parquet"),
              "--output", str(out), "--threads", "3", "--batch-size", "64"])
    assert sorted(p.name for p in out.iterdir()) == [f"part-{i:05d}.parquet" for i in range(7)]
    table = pq.read_table(out)
    assert (table.column("id").to_numpy() == np.arange(1000)).all()
    np.testing.assert_allclose(table.column("mean").to_numpy(), e(X).mean[:, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_a_folder_of_files_is_read_in_name_order(saved, tmp_path):
    e, root = saved
    table = pq.read_table(root / "in.parquet")
    (tmp_path / "in").mkdir()
    for name, start, length in (("part-b", 400, 300), ("part-a", 0, 400), ("part-c", 700, 300)):
        pq.write_table(table.slice(start, length), tmp_path / "in" / f"{name}.parquet")
    job.main(["--ensemble", str(root / "ensemble"), "--data", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    out = pq.read_table(tmp_path / "out")
    assert (out.column("id").to_numpy() == np.arange(1000)).all()
    np.testing.assert_allclose(out.column("mean").to_numpy(), e(X).mean[:, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_uris_for_input_and_output(saved, tmp_path, monkeypatch):
    e, root = saved
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    job.main(["--ensemble", f"file://{root / 'ensemble'}", "--data", f"file://{root / 'in.parquet'}",
              "--output", f"file://{tmp_path / 'out'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    np.testing.assert_allclose(pq.read_table(tmp_path / "out").column("mean").to_numpy(), e(X).mean[:, 0].numpy(),
                               rtol=1e-5, atol=1e-5)


def test_only_repeating_columns_are_dictionary_encoded(saved):
    _, root = saved
    metadata = pq.ParquetFile(next(run(root).glob("*.parquet"))).metadata.row_group(0)
    encodings = {metadata.column(i).path_in_schema: metadata.column(i).encodings for i in range(metadata.num_columns)}
    assert any("DICTIONARY" in enc for enc in encodings["note"])  # one value, repeated
    for distinct in ("id", "mean", "variance"):
        assert not any("DICTIONARY" in enc for enc in encodings[distinct]), encodings[distinct]


def test_a_failure_stops_the_job_and_leaves_no_output(saved, tmp_path, monkeypatch):
    _, root = saved
    table = pq.read_table(root / "in.parquet")
    bad = table.set_column(table.column_names.index("a"), "a", pa.array([float("nan")] * 100 + [1.0] * 900))
    write_row_groups(tmp_path / "in.parquet", bad, 100)
    calls, predict = [], job.BatchPredictor.__call__
    monkeypatch.setattr(job.BatchPredictor, "__call__", lambda self, t: calls.append(1) or predict(self, t))
    with pytest.raises(ValueError, match="NaN"):
        job.main(["--ensemble", str(root / "ensemble"), "--data", str(tmp_path / "in.parquet"),
                  "--output", str(tmp_path / "out"), "--threads", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]
    assert len(calls) < 5  # of 10 pieces: the rest were cancelled


def test_csv_input_gives_the_same_predictions(saved, tmp_path):
    e, root = saved
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("b,a,c\n" + "\n".join(f"{b},{a},{c}" for a, b, c in X[:50].tolist()))
    out = tmp_path / "out"
    job.main(["--ensemble", str(root / "ensemble"), "--data", str(csv_path), "--output", str(out)])
    np.testing.assert_allclose(pq.read_table(out).column("mean").to_numpy(), e(X[:50]).mean[:, 0].numpy(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make_input, extra, message", [
    (lambda d: pq.write_table(pa.table({"a": [1.0], "c": [2.0]}), d / "t.parquet"), [], r"lacks the feature column\(s\) \['b'\]"),
    (lambda d: None, [], "does not exist"),
    (lambda d: pq.write_table(pa.table({"a": [1.0], "b": [2.0], "c": [3.0]}), d / "t.parquet"),
     ["--ensemble", "/nonexistent"], "no manifest.json"),
    (lambda d: pq.write_table(pa.table({"a": [1.0], "b": [2.0], "c": [3.0]}), d / "t.parquet"),
     ["--coverage", "1.5"], "'--coverage'"),
])
def test_clear_errors_before_anything_is_written(saved, tmp_path, capsys, make_input, extra, message):
    _, root = saved
    make_input(tmp_path)
    argv = ["--ensemble", str(root / "ensemble"), "--data", str(tmp_path / "t.parquet"),
            "--output", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        job.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_classifier_goes_through_the_same_job(tmp_path):
    labels = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    clf = DeepEnsembleClassifier(dim_in=3, num_classes=3, num_members=2, hidden_dim=16, depth=2)
    Trainer(clf, TensorDataset(X, labels, feature_names=["a", "b", "c"]), train_num_epochs=2,
            results_folder=tmp_path / "r").train()
    clf.save(tmp_path / "clf")
    pq.write_table(pa.table({"key": np.arange(1000), "a": X[:, 0].numpy(), "b": X[:, 1].numpy(),
                             "c": X[:, 2].numpy()}), tmp_path / "in.parquet")
    job.main(["--ensemble", str(tmp_path / "clf"), "--data", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "o")])
    out = pq.read_table(tmp_path / "o").to_pandas()
    assert list(out.columns) == ["key", "prob_0", "prob_1", "prob_2", "entropy", "mutual_information", "predicted"]
    np.testing.assert_allclose(out[["prob_0", "prob_1", "prob_2"]].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["entropy"], clf(X).entropy[:, 0].numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.ray
def test_ray_data_actors_give_the_same_output(saved):
    e, root = saved
    out = root / "ray-out"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "predict.py"), "--ensemble", str(root / "ensemble"),
                           "--data", str(root / "in.parquet"), "--output", str(out), "--num-workers", "2",
                           "--batch-size", "200"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, RAY_ADDRESS=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out).to_pandas().sort_values("id")
    np.testing.assert_allclose(table["mean"], e(X).mean[:, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_the_benchmark_runs_and_saves_its_figures(tmp_path, monkeypatch):
    import benchmark_predict

    monkeypatch.setenv("RAY_ADDRESS", "")  # its Ray run starts its own local instance
    benchmark_predict.main(["--rows", "3000", "--workdir", str(tmp_path), "--ray-workers", "1"])
    [figures] = json.loads((tmp_path / "predict_speed.json").read_text())["runs"]
    assert figures["rows"] == 3000 and figures["peak_rss_mib"] > 0 and figures["speedup_vs_naive_job"] > 0
    assert figures["max_difference"] < 1e-4  # the naive job computed what the job did
    assert figures["ray_seconds"] > 0 and figures["ray_peak_pss_mib"] > 0
    for output in ("pred_3000", "ray_3000"):
        assert pq.read_table(tmp_path / output).num_rows == 3000
