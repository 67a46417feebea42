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
from conftest import REPO, shared_local_ray
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


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
def test_row_groups_are_predicted_in_parallel_into_files_in_input_order(saved, tmp_path):
    e, root = saved
    write_row_groups(tmp_path / "in.parquet", pq.read_table(root / "in.parquet"), 150)
    out = tmp_path / "out"
    job.main(["--ensemble", str(root / "ensemble"), "--data", str(tmp_path / "in.parquet"),
              "--output", str(out), "--threads", "3", "--batch-size", "64"])
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"part-{i:05d}.parquet" for i in range(7)]
    table = pq.read_table(out)
    assert (table.column("id").to_numpy() == np.arange(1000)).all()
    np.testing.assert_allclose(table.column("mean").to_numpy(), e(X).mean[:, 0].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.unit
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


@pytest.mark.unit
def test_uris_for_input_and_output(saved, tmp_path, monkeypatch):
    e, root = saved
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    job.main(["--ensemble", f"file://{root / 'ensemble'}", "--data", f"file://{root / 'in.parquet'}",
              "--output", f"file://{tmp_path / 'out'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    np.testing.assert_allclose(pq.read_table(tmp_path / "out").column("mean").to_numpy(), e(X).mean[:, 0].numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_only_repeating_columns_are_dictionary_encoded(saved):
    _, root = saved
    metadata = pq.ParquetFile(next(run(root).glob("*.parquet"))).metadata.row_group(0)
    encodings = {metadata.column(i).path_in_schema: metadata.column(i).encodings for i in range(metadata.num_columns)}
    assert any("DICTIONARY" in enc for enc in encodings["note"])  # one value, repeated
    for distinct in ("id", "mean", "variance"):
        assert not any("DICTIONARY" in enc for enc in encodings[distinct]), encodings[distinct]


@pytest.mark.unit
def test_a_failure_stops_the_job_and_leaves_no_output(saved, tmp_path, monkeypatch, capsys):
    _, root = saved
    table = pq.read_table(root / "in.parquet")
    bad = table.set_column(table.column_names.index("a"), "a", pa.array([float("nan")] * 100 + [1.0] * 900))
    write_row_groups(tmp_path / "in.parquet", bad, 100)
    from ray_ensembles.model.inference import BatchPredictor  # the job's, which it imports when it runs

    calls, predict = [], BatchPredictor.__call__
    monkeypatch.setattr(BatchPredictor, "__call__", lambda self, t: calls.append(1) or predict(self, t))
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--ensemble", str(root / "ensemble"), "--data", str(tmp_path / "in.parquet"),
                  "--output", str(tmp_path / "out"), "--threads", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]
    assert len(calls) < 5  # of 10 pieces: the rest were cancelled


@pytest.mark.unit
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
    (lambda d: (d / "t.csv").write_text("a,b,c\n"), ["--data", "{d}/t.csv"], "has no rows"),
    (lambda d: (d / "t.parquet").write_bytes(b""), [], "could not be read"),
    (lambda d: pq.write_table(pa.table({"a": pa.array([], pa.float64()), "b": pa.array([], pa.float64()),
                                        "c": pa.array([], pa.float64())}), d / "t.parquet"), [], "has no rows"),
    (lambda d: pq.write_table(pa.table({"a": [1.0, None], "b": [2.0, 2.0], "c": [3.0, 3.0]}), d / "t.parquet"),
     [], "Column .a. must be free of missing, NaN and inf"),
    (lambda d: (d / "t.csv").write_bytes("a,b,c,caf\xe9\n1,2,3,4\n".encode("latin-1")),
     ["--data", "{d}/t.csv"], r"t\.csv could not be read.*utf-8"),
    (lambda d: (d / "t.txt").write_text("a,b,c\n1,2,3\n"), ["--data", "{d}/t.txt"], r"\.csv"),
])
@pytest.mark.unit
def test_clear_errors_before_anything_is_written(saved, tmp_path, capsys, make_input, extra, message):
    _, root = saved
    make_input(tmp_path)
    argv = ["--ensemble", str(root / "ensemble"), "--data", str(tmp_path / "t.parquet"),
            "--output", str(tmp_path / "out"), *[a.format(d=tmp_path) for a in extra]]
    with pytest.raises(SystemExit) as exit_info:
        job.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("output, why", [
    ("{d}", "holds"), ("{d}/data", "holds"), (".", "holds"), ("..", "holds"),
    ("{d}/file", "a file is there"), ("{d}/theirs", "not predictions"),
])
@pytest.mark.unit
def test_an_output_path_that_holds_anything_else_is_refused_and_left_intact(saved, tmp_path, capsys,
                                                                              monkeypatch, output, why):
    _, root = saved
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"a": [1.0], "b": [2.0], "c": [3.0]}), tmp_path / "data" / "t.parquet")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path / "data")
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exit_info:
            job.main(["--ensemble", str(root / "ensemble"), "--data", str(tmp_path / "data" / "t.parquet"),
                      "--output", output.format(d=tmp_path), *overwrite])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and why in err and "\n" not in err, err
        if output.endswith("theirs"):  # --overwrite is how to replace a folder of one's own
            break
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.unit
def test_a_previous_output_is_replaced_and_overwrite_replaces_any_folder(saved, tmp_path, capsys):
    _, root = saved
    argv = ["--ensemble", str(root / "ensemble"), "--data", str(root / "in.parquet"), "--output", str(tmp_path / "out")]
    job.main(argv)
    (tmp_path / "out" / "part-00099.parquet").write_bytes(b"stale")  # replaced with the rest
    job.main(argv)
    assert not (tmp_path / "out" / "part-00099.parquet").exists()
    assert pq.read_table(tmp_path / "out").num_rows == 1000
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("old")
    job.main([*argv[:-1], str(tmp_path / "theirs"), "--overwrite"])
    assert pq.read_table(tmp_path / "theirs").num_rows == 1000 and not (tmp_path / "theirs" / "notes.txt").exists()


@pytest.mark.unit
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
                          env=dict(os.environ, RAY_ADDRESS=shared_local_ray()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out).to_pandas().sort_values("id")
    np.testing.assert_allclose(table["mean"], e(X).mean[:, 0].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.e2e  # it runs the job and the naive job as real processes (the Ray Data path has its own tests)
def test_the_benchmark_runs_and_saves_its_figures(tmp_path):
    from benchmarks import benchmark_predict

    benchmark_predict.main(["--rows", "3000", "--workdir", str(tmp_path)])
    [figures] = json.loads((tmp_path / "predict_speed.json").read_text())["runs"]
    assert figures["rows"] == 3000 and figures["peak_rss_mib"] > 0 and figures["speedup_vs_naive_job"] > 0
    assert figures["max_difference"] < 1e-4  # the naive job computed what the job did
    assert pq.read_table(tmp_path / "pred_3000").num_rows == 3000
