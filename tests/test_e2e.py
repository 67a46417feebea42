"""A real local Ray head, a real `ray job submit`, and the head stopped by its own PID."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_head import local_ray_head
from conftest import REPO
from ray_ensembles import DeepEnsemble

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head():
    with local_ray_head() as (address, env, _):
        yield address, env


def submit(ray_head, *entrypoint):
    address, env = ray_head
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--", "python", *entrypoint], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output), output[-2000:]


def test_ray_job_submit_trains_and_saves_an_ensemble(ray_head, tmp_path):
    out = tmp_path / "out"
    submit(ray_head, "jobs/train_ensemble.py", "--smoke-test", "--output", str(out))
    ensemble = DeepEnsemble.load(out / "ensemble")
    assert ensemble.num_members == 2 and ensemble.normalization_fitted


def test_ray_job_submit_predicts_on_ray_data_actors(ray_head, tmp_path):
    X = torch.randn(500, 2)
    e = DeepEnsemble(dim_in=2, num_members=2, hidden_dim=8, seed=0)
    e.feature_names = ["a", "b"]
    e.fit_normalization(X, X[:, :1])
    e.save(tmp_path / "ensemble")
    pq.write_table(pa.table({"id": np.arange(500), "b": X[:, 1].numpy(), "a": X[:, 0].numpy()}),
                   tmp_path / "in.parquet")
    submit(ray_head, "jobs/predict.py", "--ensemble", str(tmp_path / "ensemble"), "--data",
           str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--num-workers", "2",
           "--batch-size", "100")
    out = pq.read_table(tmp_path / "out").to_pandas().sort_values("id")
    np.testing.assert_allclose(out["mean"], e(X).mean[:, 0].numpy(), rtol=1e-5, atol=1e-5)
