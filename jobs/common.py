"""What the jobs share: the data options, the built-in toy data, one-line errors."""

from __future__ import annotations

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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ray_ensembles import TensorDataset  # noqa: E402
from ray_ensembles.data import read_table, table_to_dataset  # noqa: E402


def add_data_arguments(parser):
    data = parser.add_argument_group("data (default: the paper's toy cubic problem)")
    data.add_argument("--data", help="Parquet or CSV file: local path or URI (s3://, gs://, ...)")
    data.add_argument("--target", help="target column (required with --data)")
    data.add_argument("--features", help="comma-separated feature columns (default: every other numeric column)")
    data.add_argument("--task", choices=["regression", "classification"], default="regression")
    data.add_argument("--validation-fraction", type=float, default=0.1,
                      help="share of the TRAINING rows held out for validation metrics")


def default_lr(args, num_rows: int) -> float:
    """The rate for --epochs of --batch-size over num_rows rows when --lr is not given."""
    from ray_ensembles.trainer import num_steps  # here: the prediction job imports this module too
    from ray_ensembles.training import horizon_lr

    return horizon_lr(num_steps(num_rows, args.batch_size, None, args.epochs))


def toy_data(n: int, seed: int) -> TensorDataset:
    """The paper's Figure 1: x ~ U[-4, 4], y = x^3 + N(0, 3^2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 8 - 4
    return TensorDataset(x, x ** 3 + 3 * torch.randn(n, 1, generator=g), feature_names=["x"])


def load_data(args, allow_no_validation: bool = True):
    """(train, validation) datasets, checked before any Ray work. The toy problem's validation
    set is a fresh sample of the same distribution; a table's is carved from its rows."""
    if args.data is None:
        return toy_data(20, args.seed), toy_data(1000, args.seed + 1)
    if not args.target:
        raise ValueError("The '--target' option is required with --data. Got nothing instead.")
    features = args.features.split(",") if args.features else None
    dataset = table_to_dataset(read_table(args.data), args.target, features, args.task)
    if args.validation_fraction == 0 and allow_no_validation:
        return dataset, None
    return dataset.split(args.validation_fraction, seed=args.seed)


def add_console_arguments(parser, tracking: bool = True):
    out = parser.add_argument_group("console and tracking")
    out.add_argument("--verbose", action="store_true", help="Ray's own INFO logs on the console too")
    out.add_argument("--quiet", action="store_true", help="print only the final table")
    out.add_argument("--json", action="store_true", help="print only the metrics, as one JSON object")
    if tracking:
        out.add_argument("--mlflow-tracking-uri", default=None,
                         help="log to MLflow: a server URL, sqlite:///file.db or a local folder")
        out.add_argument("--mlflow-experiment", default="ray_ensembles")
        out.add_argument("--tensorboard-dir", default=None, help="write TensorBoard event files here")


def say(args, *lines):
    """Print unless --quiet or --json: the header and notes a person reads."""
    if not (args.quiet or args.json):
        print(*lines, sep="\n", flush=True)


def start_ray(args) -> str:
    """Join RAY_ADDRESS (set by `ray job submit`) or a running cluster, else start a local Ray;
    returns a line saying which, with its resources.

    Unless --verbose, Ray's INFO logs stay in its log files (the session folder, the dashboard),
    and a Ray this job starts runs without Ray Train's preemption watcher: nothing drains the
    nodes of a local instance, and the watcher's start and shutdown print two internal errors.
    """
    import ray

    dashboard = None
    if not ray.is_initialized():
        if not args.verbose:
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # reaches only a Ray started here
        context = ray.init(logging_config=ray.LoggingConfig(log_level="INFO" if args.verbose else "WARNING"))
        dashboard = context.dashboard_url
    have = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    return (f"Ray at {ray.get_runtime_context().gcs_address}"
            + (f" (dashboard http://{dashboard})" if dashboard else "")
            + f": {nodes} node{'s' * (nodes != 1)}, {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs")


def loggers(args, run_name: str | None = None) -> list:
    """The experiment trackers the options ask for (ray_ensembles.tracking)."""
    from ray_ensembles.tracking import MLflowLogger, TensorBoardLogger

    chosen = []
    if args.mlflow_tracking_uri:
        chosen.append(MLflowLogger(args.mlflow_tracking_uri, experiment_name=args.mlflow_experiment,
                                   run_name=run_name))
    if args.tensorboard_dir:
        chosen.append(TensorBoardLogger(args.tensorboard_dir))
    return chosen


def num_classes(*datasets) -> int:
    return max(2, max(int(d.y.max()) for d in datasets if d is not None) + 1)


def fail(message: str):
    """Exit with one line: the jobs' contract for bad options and data."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


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
