"""A real local Ray head for the e2e tests and the load test, stopped by its PID."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray_head(num_cpus: int = 2):
    """A real `ray start --head --block` on this machine with its own ports and temp dir; yields
    (dashboard address, environment for `ray job submit`, the head's process) and stops that
    head, by its PID, on exit. Never `ray stop`, which would kill every Ray on the machine."""
    bin_dir = Path(sys.executable).parent
    # `python` in a job's entrypoint resolves with the head's PATH: put this interpreter first
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    dashboard, gcs = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"rayens-{os.getpid()}-{gcs}"  # short: Ray's socket paths are length-limited
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--num-cpus={num_cpus}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--temp-dir={temp_dir}", f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    raise RuntimeError("the Ray head did not start within 90 s")
                time.sleep(1)
        yield address, env, head
    finally:
        # Job drivers run in sessions of their own: killing the head's group leaves them running,
        # and a killed job's drivers spun at 40% of a core each for two minutes. Note them first.
        descendants = []
        with contextlib.suppress(psutil.Error):
            descendants = psutil.Process(head.pid).children(recursive=True)
        # SIGTERM to the head alone lets it stop its processes, in 2-4 s. Whatever is still running
        # after 5 s is killed: after a Ray Data job, Ray Data's detached actors held the head for
        # 30 s, and a SIGTERM to the whole group took 16-33 s.
        head.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        for process in descendants:
            with contextlib.suppress(psutil.Error):
                process.kill()
