"""Ensembles, tables and the jobs' checks against a real S3 API (moto's server on localhost)."""

import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO
from ray_ensembles import DeepEnsemble
from ray_ensembles.loop.data import read_table
from ray_ensembles.io.locations import check_store, join
from s3_store import s3_store


@pytest.fixture(scope="module")
def store():
    with s3_store() as store:
        yield store


@pytest.fixture
def aws_env(store, monkeypatch):
    for key, value in store.env.items():
        monkeypatch.setenv(key, value)
    return store


def small(num_members=2, seed=0):
    X = torch.randn(50, 3, generator=torch.Generator().manual_seed(seed))
    ensemble = DeepEnsemble(dim_in=3, num_members=num_members, hidden_dim=8, seed=seed)
    ensemble.fit_normalization(X, X[:, :1])
    return ensemble, X


def visible_objects(log, prefix: str) -> list[str]:
    """The keys under `prefix` in the order they became visible (a PutObject, or the completion
    of a multipart upload) or were deleted ('-' + key), from the server's request log."""
    events = []
    for method, path, query in log:
        if not path.startswith(prefix) or path.endswith("/"):
            continue
        if (method == "PUT" and "partNumber" not in query) or (method == "POST" and "uploadId=" in query):
            events.append(path[len(prefix):])
        elif method == "DELETE" and not query:
            events.append("-" + path[len(prefix):])
    return events


@pytest.mark.unit
def test_join_keeps_a_uris_query_at_the_end():
    assert join("s3://b/runs?endpoint_override=h:1&scheme=http", "r1", "ensemble") == \
        "s3://b/runs/r1/ensemble?endpoint_override=h:1&scheme=http"
    assert join("s3://b/runs/", "r1") == "s3://b/runs/r1"
    assert join("/tmp/runs", "r1") == "/tmp/runs/r1"


@pytest.mark.unit
def test_an_ensemble_saves_to_and_loads_from_s3_with_the_endpoint_in_the_environment(aws_env):
    ensemble, X = small()
    uri = aws_env.uri("env/ensemble")
    assert ensemble.save(uri) == uri
    loaded = DeepEnsemble.load(uri)
    torch.testing.assert_close(loaded(X).mean, ensemble(X).mean, rtol=0, atol=0)
    assert sorted(aws_env.keys("env/ensemble/")) == ["env/ensemble/manifest.json", "env/ensemble/member_000.safetensors",
                                                     "env/ensemble/member_001.safetensors"]


@pytest.mark.unit
def test_the_uri_query_alone_reaches_the_store(store, monkeypatch):
    for key, value in store.credentials.items():  # only the query names the endpoint
        monkeypatch.setenv(key, value)
    ensemble, X = small()
    uri = store.uri("query/ensemble", query=True)
    ensemble.save(uri)
    torch.testing.assert_close(DeepEnsemble.load(uri)(X).mean, ensemble(X).mean, rtol=0, atol=0)
    assert "query/ensemble/manifest.json" in store.keys("query/")
    table = store.uri("query/t.parquet", query=True)
    pq.write_table(pa.table({"a": [1.0, 2.0], "y": [3.0, 4.0]}), "ensembles/query/t.parquet",
                   filesystem=pa.fs.FileSystem.from_uri(table)[0])
    assert read_table(table).column("y").to_pylist() == [3.0, 4.0]


@pytest.mark.unit
def test_a_new_ensemble_replaces_the_old_with_the_manifest_deleted_first_and_written_last(aws_env):
    uri = aws_env.uri("replace/ensemble")
    small(num_members=3)[0].save(uri)
    new, X = small(num_members=2, seed=1)
    start = len(aws_env.log)
    new.save(uri)
    events = visible_objects(aws_env.log[start:], "/ensembles/replace/ensemble/")
    # no moment holds a manifest beside member files it does not describe
    assert events == ["-manifest.json", "member_000.safetensors", "member_001.safetensors",
                      "manifest.json", "-member_002.safetensors"]
    assert sorted(aws_env.keys("replace/")) == [f"replace/ensemble/{n}" for n in
                                                ("manifest.json", "member_000.safetensors", "member_001.safetensors")]
    torch.testing.assert_close(DeepEnsemble.load(uri)(X).mean, new(X).mean, rtol=0, atol=0)


@pytest.mark.unit
def test_a_location_holding_other_files_is_refused_and_kept(aws_env):
    aws_env.client().put_object(Bucket=aws_env.bucket, Key="theirs/notes.txt", Body=b"mine")
    with pytest.raises(ValueError, match=r"Refusing to write an ensemble to s3://ensembles/theirs: .*notes\.txt"):
        small()[0].save(aws_env.uri("theirs"))
    assert aws_env.keys("theirs/") == {"theirs/notes.txt": 4}


@pytest.mark.unit
def test_a_store_that_goes_down_is_an_error_naming_the_uri_and_the_old_ensemble_survives(aws_env):
    uri = aws_env.uri("outage/ensemble")
    old, X = small()
    old.save(uri)
    aws_env.stop()
    try:
        started = time.time()
        with pytest.raises(OSError, match=f"location {uri} failed: .*"):
            small(seed=1)[0].save(uri)
        with pytest.raises(OSError, match=f"location {uri} failed: .*"):
            DeepEnsemble.load(uri)
        assert time.time() - started < 60  # an error, not a hang
    finally:
        aws_env.start()
    torch.testing.assert_close(DeepEnsemble.load(uri)(X).mean, old(X).mean, rtol=0, atol=0)


@pytest.mark.unit
def test_an_incomplete_ensemble_on_s3_is_refused_by_name(aws_env):
    uri = aws_env.uri("incomplete/ensemble")
    small()[0].save(uri)
    aws_env.client().delete_object(Bucket=aws_env.bucket, Key="incomplete/ensemble/member_001.safetensors")
    with pytest.raises(ValueError, match=f"{uri} is not a complete saved ensemble: it has no member_001"):
        DeepEnsemble.load(uri)
    aws_env.client().delete_object(Bucket=aws_env.bucket, Key="incomplete/ensemble/manifest.json")
    with pytest.raises(ValueError, match="it has no manifest.json"):
        DeepEnsemble.load(uri)


@pytest.mark.unit
def test_check_store_refuses_a_missing_bucket_and_bad_credentials_and_leaves_nothing(aws_env):
    check_store(aws_env.uri("runs"), "--storage-path", write=True)
    assert not aws_env.keys("runs/")  # the probe is gone
    with pytest.raises(ValueError, match=r"The '--storage-path' location s3://missing-bucket/runs is in a "
                                         r"bucket that does not exist \('missing-bucket'\)"):
        check_store("s3://missing-bucket/runs", "--storage-path", write=True)
    with aws_env.authentication(), pytest.raises(ValueError, match=r"The '--data' location s3://ensembles/t.parquet failed: .*"):
        check_store(aws_env.uri("t.parquet"), "--data")


def run(job, *argv):
    return subprocess.run([sys.executable, str(REPO / "jobs" / job), *argv], capture_output=True, text=True,
                          env=os.environ, timeout=120)


@pytest.mark.ray
@pytest.mark.parametrize("job, option, fault", [
    ("train_ensemble.py", "--storage-path", "missing bucket"), ("predict.py", "--output", "missing bucket"),
    ("train_ensemble.py", "--data", "bad credentials"), ("predict.py", "--ensemble", "bad credentials"),
], ids=lambda value: value if " " in value else None)
def test_the_jobs_refuse_a_missing_bucket_and_bad_credentials_in_one_line_before_ray(aws_env, tmp_path, job, option, fault):
    store = aws_env
    ensemble, X = small()
    ensemble.feature_names = ["a", "b", "c"]
    pq.write_table(pa.table({"a": X[:, 0].numpy(), "b": X[:, 1].numpy(), "c": X[:, 2].numpy(), "y": X[:, 0].numpy()}),
                   tmp_path / "t.parquet")
    store.client().upload_file(str(tmp_path / "t.parquet"), store.bucket, "jobs/t.parquet")
    ensemble.save(store.uri("jobs/ensemble"))
    data = store.uri("jobs/t.parquet")
    args = {"train_ensemble.py": ["--data", data, "--target", "y", "--output", str(tmp_path / "out")],
            "predict.py": ["--ensemble", store.uri("jobs/ensemble"), "--data", data,
                           "--output", store.uri("jobs/predictions")]}[job]
    credentials = fault == "bad credentials"
    if not credentials:
        args += [option, f"s3://missing-bucket/{option.strip('-')}"]  # the later option wins
    with store.authentication() if credentials else contextlib.nullcontext():
        proc = run(job, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: The '{option}' location s3://"), line
    assert ("does not exist" in line) != credentials and "Ray at" not in proc.stdout
    if credentials:
        assert "InvalidAccessKeyId" in line or "ACCESS_DENIED" in line or "403" in line, line


@pytest.mark.ray
def test_predictions_on_s3_in_process_equal_the_ensemble(aws_env, tmp_path):
    store = aws_env
    ensemble, X = small()
    ensemble.feature_names = ["a", "b", "c"]
    ensemble.save(store.uri("inproc/ensemble"))
    table = pa.table({"id": np.arange(50), "c": X[:, 2].numpy(), "a": X[:, 0].numpy(), "b": X[:, 1].numpy()})
    pq.write_table(table, tmp_path / "in.parquet")
    store.client().upload_file(str(tmp_path / "in.parquet"), store.bucket, "inproc/in.parquet")
    proc = run("predict.py", "--ensemble", store.uri("inproc/ensemble"), "--data", store.uri("inproc/in.parquet"),
               "--output", store.uri("inproc/out"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["rows"] == 50
    out = read_table(store.uri("inproc/out") + "/part-00000.parquet").to_pandas().sort_values("id")
    np.testing.assert_allclose(out["mean"], ensemble(X).mean[:, 0].numpy(), rtol=1e-6, atol=1e-6)

