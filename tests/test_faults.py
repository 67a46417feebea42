"""A driver killed mid-run resumes from its checkpoints when the job is run again with --resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from ray_ensembles import DeepEnsemble, Trainer

pytestmark = pytest.mark.ray


def test_a_killed_driver_resumes_with_the_same_name_to_the_same_result(tmp_path):
    runs = tmp_path / "runs"
    argv = [sys.executable, str(REPO / "jobs" / "train_ensemble.py"), "--epochs", "3000", "--save-every", "300",
            "--num-members", "2", "--num-workers", "1", "--storage-path", str(runs), "--name", "r",
            "--output", str(tmp_path / "out")]
    # Each report waits for the controller's poll: 0.5 s makes the ten checkpoints take at least
    # 5 s, so the job is still running when the kill comes (with faster polls it could finish first).
    env = dict(os.environ, RAY_ADDRESS="", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 120
    while not (runs / "r" / "checkpoint_manager_snapshot.json").exists():  # a committed checkpoint
        assert driver.poll() is None and time.time() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started
    driver.wait()

    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "pass --resume" in again.stderr  # no silent resume
    resumed = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert 300 < history[0]["step"] < 3000  # it continued from a checkpoint, not from scratch

    import train_ensemble as job  # the same ensemble, trained uninterrupted in-process
    args = job.parse_args(["--epochs", "3000", "--num-members", "2"])
    ensemble, train, _ = job.build(args)
    Trainer(ensemble, train, train_batch_size=args.batch_size, train_lr=args.lr, train_num_epochs=args.epochs,
            results_folder=tmp_path / "reference", save_every=10 ** 9).train()
    loaded = DeepEnsemble.load(tmp_path / "out" / "ensemble")
    for k, v in ensemble.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=1e-6, rtol=1e-5, msg=k)
