import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "jobs"))  # the job scripts import as modules in tests
sys.path.insert(0, str(REPO))  # and the benchmarks as benchmarks.<name>, as they run

# Ray settings for quiet, fast tests; harmless for tests that never start Ray.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no S3 client looks for a cloud's metadata
# Ray Data's first Parquet reader, as the jobs read: the V2 default starts footer-reading
# processes for every read, about 1 s a read here (jobs/common.py); one test trains on a V2 read.
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
torch.set_num_threads(1)


LAYERS = ("unit", "ray", "e2e")
# modules that stop the shared local Ray to start their own: they run last, so that it starts once
OWN_RAY_MODULES = ("test_cluster.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    """Every test declares exactly one layer (module `pytestmark` or its own mark): a test that
    starts Ray or a subprocess must not pass for a unit test."""
    items.sort(key=lambda item: item.path.name in OWN_RAY_MODULES)  # stable: the order within stays
    wrong = [f"{item.nodeid}: {names or 'none'}" for item in items
             if len(names := sorted({m.name for m in item.iter_markers() if m.name in LAYERS})) != 1]
    if wrong:
        raise pytest.UsageError("Each test needs exactly one of the markers " + ", ".join(LAYERS)
                                + ":\n  " + "\n  ".join(wrong))


@pytest.fixture
def toy_data():
    """y = x0^3 / 10 + sin(x1) + noise, 200 rows, 2 inputs."""
    g = torch.Generator().manual_seed(123)
    X = torch.rand(200, 2, generator=g) * 8 - 4
    y = X[:, :1] ** 3 / 10 + X[:, 1:].sin() + 0.3 * torch.randn(200, 1, generator=g)
    return X, y


def require_data(*parts):
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder beside the repository)")
    return path


def start_local_ray(**options):
    """`ray.init` of a local Ray with this machine's 2 CPUs, its logs off the console."""
    import ray

    return ray.init(**{"address": "local", "num_cpus": 2, "log_to_driver": False, "include_dashboard": False,
                       **options})


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """For what is refused before Ray starts: any `ray.init` fails the test, and Ray looks not
    started, whether or not the shared local Ray runs."""
    import ray

    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def shared_local_ray() -> str:
    """The local Ray that every module without a Ray of its own shares (a start costs seconds):
    started by the first test that asks, stopped when the session ends or when a module that needs
    a Ray of its own starts one (`own_local_ray`). Returns its address, for jobs run as processes."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    return ray.get_runtime_context().gcs_address


def own_local_ray(**options):
    """A local Ray for one module alone (its own runtime environment, say): the shared one stops first."""
    import ray

    ray.shutdown()
    return start_local_ray(**options)


def pytest_sessionfinish(session, exitstatus):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
