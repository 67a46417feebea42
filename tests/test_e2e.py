"""The cluster story end to end, as the README tells it: a head and a second node started with
`ray start --address`, each with its own temp dir, sharing nothing but an S3 API (moto's server,
in this process); token authentication on, and `ray job submit` refused without the token; runs,
ensembles, predictions and sweeps on S3; a killed driver and a store that goes down, each
resumed to the uninterrupted result. Everything is stopped by its PID or handle.

The nodes get the store's credentials but not its endpoint: every URI names it in its query
(`s3://b/p?endpoint_override=...&scheme=http`), which Ray Train, Ray Tune and Ray Data must honour
on both nodes. The endpoint in the environment is what tests/test_s3.py uses."""

import csv
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO
from ray_ensembles import DeepEnsemble
from ray_ensembles.io.locations import filesystem_for
from ray_head import BIN, local_ray_head
from s3_store import s3_store

pytestmark = pytest.mark.e2e

G = np.random.default_rng(0)
X = G.normal(size=(300, 3)).astype(np.float32)
Y = X[:, 0] - X[:, 2] ** 2 + 0.1 * G.normal(size=300).astype(np.float32)
# 2 members on 2 workers of 2 CPUs: one per node. 600 steps, 6 checkpoints, so that a run can be stopped
# between its first and its last (each costs about a second on this S3).
TRAIN = ["--target", "y", "--features", "a,b,c", "--num-members", "2", "--num-workers", "2", "--cpus-per-worker", "2",
         "--epochs", "24", "--batch-size", "10", "--lr", "0.01", "--save-every", "100", "--json"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with s3_store() as store, local_ray_head(num_cpus=2, num_nodes=2, env=store.credentials) as (address, env, _), \
            pytest.MonkeyPatch.context() as patch:
        for key, value in store.credentials.items():  # this process reads S3 too
            patch.setenv(key, value)
        local = tmp_path_factory.mktemp("tables")
        for name, rows in (("train", slice(0, 250)), ("test", slice(250, 300))):
            table = pa.table({"id": np.arange(300)[rows], "a": X[rows, 0], "b": X[rows, 1], "c": X[rows, 2], "y": Y[rows]})
            pq.write_table(table, local / f"{name}.parquet")
            store.client().upload_file(str(local / f"{name}.parquet"), store.bucket, f"data/{name}.parquet")
        yield store, address, env


def uri(store, path: str) -> str:
    return store.uri(path, query=True)


def submit(cluster, *entrypoint, wait=True, succeeds=True):
    """`ray job submit` with the token; returns the job's output (stdout and logs)."""
    _, address, env = cluster
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
                           *([] if wait else ["--no-wait"]), "--", "python", *entrypoint],
                          env=env, capture_output=True, text=True, timeout=400)
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    succeeded = proc.returncode == 0 and (not wait or re.search(r"Job 'raysubmit_\w+' succeeded", output))
    assert bool(succeeded) == succeeds, output[-4000:]
    return output


def job_id(output: str) -> str:
    return re.search(r"Job '(raysubmit_\w+)' submitted", output).group(1)


def job_api(cluster, job: str, path: str = "", method: str = "GET") -> dict:
    """The head's job API, with the token: what `ray job status`, `stop` and `logs` ask, without
    starting a CLI process (about 1.5 s each here) per question."""
    _, address, env = cluster
    request = urllib.request.Request(f"{address}/api/jobs/{job}{path}", method=method,
                                     headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    return json.load(urllib.request.urlopen(request, timeout=60))


def job_status(cluster, job: str) -> str:
    return job_api(cluster, job)["status"]


def job_summary(output: str) -> dict:
    (line,) = [line for line in output.splitlines() if line.startswith('{"metrics"')]
    return json.loads(line)


def assert_same_members(a: DeepEnsemble, b: DeepEnsemble):
    for i in range(a.num_members):
        for key, value in a.members.member_state(i).items():
            torch.testing.assert_close(b.members.member_state(i)[key], value, atol=1e-6, rtol=1e-5, msg=key)


@pytest.fixture(scope="module")
def first_run(cluster, tmp_path_factory):
    store = cluster[0]
    out = tmp_path_factory.mktemp("r1")
    output = submit(cluster, "jobs/train_ensemble.py", "--data", uri(store, "data/train.parquet"), *TRAIN,
                    "--storage-path", uri(store, "runs"), "--name", "r1", "--output", str(out))
    return job_summary(output), DeepEnsemble.load(uri(store, "runs/r1/ensemble"))


def test_a_job_trains_members_on_both_nodes_and_its_ensemble_loads_from_s3(cluster, first_run):
    summary, ensemble = first_run
    assert len({where["node_id"] for where in summary["placement"].values()}) == 2, summary["placement"]
    assert summary["checkpoint"] == uri(cluster[0], "runs/r1/ensemble")
    assert ensemble.num_members == 2 and ensemble.feature_names == ["a", "b", "c"]


def test_predictions_on_ray_data_are_written_to_s3_and_equal_the_ensemble(cluster, first_run):
    store, ensemble = cluster[0], first_run[1]
    submit(cluster, "jobs/predict.py", "--ensemble", uri(store, "runs/r1/ensemble"), "--data", uri(store, "data/test.parquet"),
           "--output", uri(store, "predictions"), "--num-workers", "2", "--batch-size", "20")
    filesystem, path = filesystem_for(uri(store, "predictions"))
    out = pyarrow.dataset.dataset(path, filesystem=filesystem, format="parquet").to_table().to_pandas().sort_values("id")
    np.testing.assert_allclose(out["mean"], ensemble(torch.from_numpy(X[250:])).mean[:, 0].numpy(), rtol=1e-5, atol=1e-5)


def checkpoints(store, run: str) -> set[str]:
    return {key.split("/")[2] for key in store.keys(f"runs/{run}/") if "/checkpoint_" in key}


def interrupt(cluster, run: str, out, stop, *extra) -> str:
    """Submit `run` without waiting, call `stop(job)` once a new checkpoint of it is on S3, and
    return the job's logs once it has ended: within 3 minutes, a failure, never a hang."""
    store = cluster[0]
    before = checkpoints(store, run)
    job = job_id(submit(cluster, "jobs/train_ensemble.py", "--data", uri(store, "data/train.parquet"), *TRAIN,
                        "--storage-path", uri(store, "runs"), "--name", run, "--output", str(out), *extra, wait=False))
    deadline = time.time() + 180
    while not checkpoints(store, run) - before:
        assert time.time() < deadline, f"no new checkpoint of {run} on S3 within 180 s"
        time.sleep(0.2)
    stop(job)
    while (status := job_status(cluster, job)) not in ("FAILED", "STOPPED", "SUCCEEDED"):
        assert time.time() < deadline + 180, f"the job {job} neither failed nor finished within 180 s"
        time.sleep(0.25)
    assert status != "SUCCEEDED", "the run finished before it could be interrupted"
    return job_api(cluster, job, "/logs")["logs"]


def test_a_killed_driver_and_a_store_that_goes_down_each_resume_from_s3_to_the_uninterrupted_result(
        cluster, first_run, tmp_path):
    store = cluster[0]

    def kill_driver(job):
        assert job_api(cluster, job, "/stop", method="POST")["stopped"]

    interrupt(cluster, "r2", tmp_path / "a", kill_driver)
    assert "runs/r2/ensemble/manifest.json" not in store.keys("runs/r2/")  # no ensemble, not half of one
    # no silent resume: the job refuses the name before Ray starts (run here, beside the cluster,
    # against the same store: a submission would only add the job's upload and start)
    again = subprocess.run([sys.executable, "jobs/train_ensemble.py", "--data", uri(store, "data/train.parquet"), *TRAIN,
                            "--storage-path", uri(store, "runs"), "--name", "r2", "--output", str(tmp_path / "a")],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "pass --resume" in again.stderr, again.stderr[-2000:]
    try:  # resumed, then the store goes down after the resumed run's first checkpoint
        logs = interrupt(cluster, "r2", tmp_path / "b", lambda job: store.stop(), "--resume")
    finally:
        store.start()
    assert "runs/r2/ensemble/manifest.json" not in store.keys("runs/r2/")
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert errors and "The Ray run r2 stopped because its storage failed" in errors[-1], logs[-3000:]
    assert uri(store, "runs") in errors[-1]
    submit(cluster, "jobs/train_ensemble.py", "--data", uri(store, "data/train.parquet"), *TRAIN,
           "--storage-path", uri(store, "runs"), "--name", "r2", "--resume", "--output", str(tmp_path / "c"))
    history = json.loads((tmp_path / "c" / "metrics.json").read_text())["history"]
    assert history[0]["step"] > 100  # it continued from a checkpoint (every 100 steps), not from scratch
    assert_same_members(first_run[1], DeepEnsemble.load(uri(store, "runs/r2/ensemble")))


def test_a_sweep_stores_its_trials_on_s3_and_its_best_ensemble_loads_from_there(cluster, tmp_path):
    store = cluster[0]
    submit(cluster, "jobs/tune_ensemble.py", "--data", uri(store, "data/train.parquet"), "--target", "y",
           "--features", "a,b,c", "--num-members", "1,2", "--adversarial-eps", "0", "--epochs", "3",
           "--cpus-per-worker", "0.5",
           "--num-reports", "1", "--storage-path", uri(store, "tune"), "--name", "s1", "--output", str(tmp_path), "--json")
    with (tmp_path / "trials.csv").open() as f:
        best = next(csv.DictReader(f))["ensemble_path"]
    query = uri(store, "").partition("?")[2]
    assert best.startswith(store.uri("tune/s1/trials/")) and best.endswith(f"/ensemble?{query}")
    assert any(key.startswith("tune/s1/") and "tuner.pkl" in key for key in store.keys("tune/"))
    x = torch.from_numpy(X[250:])
    torch.testing.assert_close(DeepEnsemble.load(best)(x).mean, DeepEnsemble.load(tmp_path / "best_ensemble")(x).mean,
                               rtol=0, atol=0)


def test_a_submit_without_the_token_or_with_a_wrong_one_is_refused(cluster, tmp_path):
    _, address, env = cluster
    marker = tmp_path / "ran"
    entrypoint = ["--", "python", "-c", f"open({str(marker)!r}, 'w')"]
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    for client_env in (dict(no_token, RAY_AUTH_MODE="disabled"), dict(env, RAY_AUTH_TOKEN="0" * 64)):
        proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, *entrypoint],
                              env=client_env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert "Job 'raysubmit_" not in proc.stdout + proc.stderr
    # the head itself refuses, not only the CLI: the job API without a token, and with a wrong one
    body = json.dumps({"entrypoint": f"python -c \"open({str(marker)!r}, 'w')\""}).encode()
    for headers in ({}, {"Authorization": "Bearer " + "0" * 64}):
        request = urllib.request.Request(f"{address}/api/jobs/", data=body, method="POST",
                                         headers={"Content-Type": "application/json", **headers})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code in (401, 403)
    listing = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    assert not [job for job in json.load(urllib.request.urlopen(listing, timeout=30)) if str(marker) in job["entrypoint"]]
    assert not marker.exists()
