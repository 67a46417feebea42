"""Members placed by torchrun (the launcher `accelerate launch` shares its RANK and WORLD_SIZE
with): each process trains its round-robin share, rank 0 assembles; image members with
augmentation and SGD, the same networks as in one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

import launched_train
from conftest import REPO
from ray_ensembles import DeepEnsemble

pytestmark = pytest.mark.e2e


def test_two_torchrun_processes_train_the_in_process_ensemble(tmp_path):
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    launched_train.__file__, str(tmp_path / "launched")], check=True, timeout=300,
                   cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))  # this tree's package
    ranks = [json.loads((tmp_path / "launched" / f"rank-{r}.json").read_text()) for r in range(2)]
    base = launched_train.train(tmp_path / "in-process", cpu=True)
    # members went round-robin to the ranks, and rank 0 assembled them into one checkpoint
    assert ranks[0]["placement"] == {str(m): {"rank": m % 2} for m in range(3)}
    assert ranks[0]["checkpoint"] == ranks[1]["checkpoint"] == str(tmp_path / "launched" / "checkpoint-3")
    loaded = DeepEnsemble.load(ranks[0]["checkpoint"], member_factory=launched_train.small_cnn)
    for k, v in base.ensemble.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=1e-6, rtol=1e-5, msg=k)
    for rank in ranks:  # every process ends holding the whole ensemble
        torch.testing.assert_close(torch.tensor(rank["mean"]), base.ensemble(launched_train.X).mean,
                                   atol=1e-5, rtol=1e-5)
        assert rank["metrics"]["val_nll"] == pytest.approx(base.metrics["val_nll"], rel=1e-5)
        assert rank["metrics"]["members"].keys() == {"0", "1", "2"}
    # each rank's history holds its own members' epochs
    assert [set(h["member_train_loss"]) for h in ranks[1]["history"] if "member_train_loss" in h][0] == {"1"}
