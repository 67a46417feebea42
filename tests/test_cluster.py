"""Two simulated nodes: members train across both; one node is removed mid-run; none is lost."""

import threading
import time

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from ray.train import FailureConfig, RunConfig, ScalingConfig

from ray_ensembles import DeepEnsemble, TensorDataset, Trainer

pytestmark = pytest.mark.ray

G = torch.Generator().manual_seed(0)
X = torch.randn(200, 3, generator=G)
Y = X[:, :1] - X[:, 2:] + 0.1 * torch.randn(200, 1, generator=G)
OPTIONS = dict(train_batch_size=20, train_num_epochs=150, train_lr=3e-3, save_every=100)


@pytest.fixture
def two_nodes():
    ray.shutdown()  # the tests' shared local Ray, if a module before started it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    second = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, second
    ray.shutdown()
    cluster.shutdown()


def test_removing_a_node_mid_run_loses_no_member(two_nodes, tmp_path, monkeypatch):
    cluster, second = two_nodes
    # Each report waits for the controller's poll: 0.5 s makes the 15 checkpoints take at least
    # 7 s, so the node goes while the run is still going.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # the reference stacks members as the two workers do ({0, 2} and {1, 3}): over 1,500 steps,
    # float rounding that differs between stack sizes can grow in a sensitive member
    references = {}
    for ids in ([0, 2], [1, 3]):
        part = DeepEnsemble(dim_in=3, num_members=2, member_ids=ids, hidden_dim=16, seed=3)
        Trainer(part, TensorDataset(X, Y), results_folder=tmp_path / "reference", **OPTIONS).train()
        references.update({m: part.members.member_state(i) for i, m in enumerate(ids)})

    ensemble = DeepEnsemble(dim_in=3, num_members=4, hidden_dim=16, seed=3)
    trainer = Trainer(ensemble, TensorDataset(X, Y), **OPTIONS,
                      scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1},
                                                   placement_strategy="SPREAD"),  # one worker per node
                      run_config=RunConfig(name="two-nodes", storage_path=str(tmp_path / "runs"),
                                           failure_config=FailureConfig(max_failures=2)))
    outcome = {}

    def train():
        try:
            trainer.train()
            outcome["finished"] = True
        except Exception as err:  # reported by the assertion below
            outcome["error"] = err

    run = threading.Thread(target=train)
    run.start()
    deadline = time.time() + 180
    while not list((tmp_path / "runs" / "two-nodes").glob("checkpoint_*")):
        assert time.time() < deadline and run.is_alive()
        time.sleep(0.1)
    assert run.is_alive(), "the run ended before the node could be removed"
    cluster.remove_node(second)  # its worker, and the members it trained, go with it
    run.join(timeout=300)
    assert not run.is_alive() and outcome == {"finished": True}, outcome
    assert sum(node["Alive"] for node in ray.nodes()) == 1
    assert sorted(trainer.metrics["members"]) == [0, 1, 2, 3]
    for i, m in enumerate(ensemble.member_ids):
        for k, v in references[m].items():
            torch.testing.assert_close(ensemble.members.member_state(i)[k], v, atol=1e-6, rtol=1e-5, msg=f"{m} {k}")
