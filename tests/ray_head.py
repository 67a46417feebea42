"""A real local Ray cluster for the e2e tests and the load test: a head, and optionally more
nodes, each a `ray start --block` with its own ports and temp dir, with token authentication on
(as cluster.yaml has it), stopped by their PIDs."""

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

try:
    from ports import free_port  # tests/ on the path, as under pytest
except ImportError:  # the benchmarks import this module as tests.<name>
    from tests.ports import free_port

BIN = Path(sys.executable).parent


def _ray_start(args: list[str], env: dict, temp_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", f"--temp-dir={temp_dir}",
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(node: subprocess.Popen):
    # Job drivers run in sessions of their own: killing the node's group leaves them running,
    # and a killed job's drivers spun at 40% of a core each for two minutes. Note them first.
    descendants = []
    with contextlib.suppress(psutil.Error):
        descendants = psutil.Process(node.pid).children(recursive=True)
    # SIGTERM to `ray start` alone lets it stop its processes, in 2-4 s. Whatever is still running
    # after 5 s is killed: after a Ray Data job, Ray Data's detached actors held the head for
    # 30 s, and a SIGTERM to the whole group took 16-33 s.
    node.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)
    node.wait()
    for process in descendants:
        with contextlib.suppress(psutil.Error):
            process.kill()


def alive_nodes(address: str, token: str) -> int:
    """The number of alive nodes, asked of the dashboard with the cluster's token."""
    request = urllib.request.Request(f"{address}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {token}"})
    summary = json.load(urllib.request.urlopen(request, timeout=5))["data"]["summary"]
    return sum(node["raylet"]["state"] == "ALIVE" for node in summary)


@contextlib.contextmanager
def local_ray_head(num_cpus: int = 2, num_nodes: int = 1, env: dict | None = None):
    """A head (and `num_nodes - 1` more nodes joined with `ray start --address`) on this machine,
    `num_cpus` each; yields (dashboard address, environment for clients, the head's process).
    The environment holds the cluster's token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN) and `env`,
    which every node gets too. Never `ray stop`, which would kill every Ray on the machine."""
    token = secrets.token_hex(32)
    # `python` in a job's entrypoint resolves with the head's PATH: put this interpreter first
    env = dict(os.environ, **(env or {}), PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    dashboard, gcs = free_port(), free_port()
    temp = Path("/tmp") / f"rayens-{os.getpid()}-{gcs}"  # short: Ray's socket paths are length-limited
    nodes = [_ray_start(["--head", f"--port={gcs}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                         f"--ray-client-server-port={free_port()}"], env, temp)]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        for k in range(1, num_nodes):
            nodes.append(_ray_start([f"--address=127.0.0.1:{gcs}", f"--num-cpus={num_cpus}"], env,
                                    temp.with_name(f"{temp.name}-{k}")))
        deadline = time.time() + 120
        while True:
            try:
                if alive_nodes(address, token) == num_nodes:
                    break
            except (OSError, KeyError, ValueError):
                pass
            if time.time() > deadline or any(node.poll() is not None for node in nodes):
                raise RuntimeError(f"the Ray cluster of {num_nodes} node(s) did not start within 120 s")
            time.sleep(0.25)
        yield address, env, nodes[0]
    finally:
        for node in reversed(nodes):
            _stop(node)
