"""A real local Ray head, a real `ray job submit`, and the head stopped by its own PID."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from common import local_ray_head
from conftest import REPO
from ray_ensembles import DeepEnsemble

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    with local_ray_head() as (address, env, _):
        yield address, env


def test_ray_job_submit_trains_and_saves_an_ensemble(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--", "python", "jobs/train_ensemble.py", "--smoke-test", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output), output[-2000:]
    ensemble = DeepEnsemble.load(out / "ensemble")
    assert ensemble.num_members == 2 and ensemble.normalization_fitted
