"""What the jobs share: the data and console options, starting Ray, one-line errors.

The jobs import torch, Ray and this package's modules inside the functions that use them, so
that `--help` and the option checks that need none of them answer at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
from pathlib import Path



# The toy's recipe (both jobs) is the paper's (plain NLL, a constant rate of 0.1, 40 epochs): over
# 5 seeds it keeps the curve inside mean +/- 3 sd on 93-100% of [-6, 6], where beta-NLL with a
# cosine rate of 0.01 for 200 epochs kept it on 58-73%, at z-scores up to 67 (docs/benchmarks.md,
# "Under shift").
TOY = dict(epochs=40, lr=0.1, nll_beta=0.0, lr_schedule="constant")


def add_data_arguments(parser):
    data = parser.add_argument_group("data (default: the paper's toy cubic problem)")
    data.add_argument("--data", help="Parquet or CSV file, or a NumPy .npz file of arrays X (N, ...) and y "
                                     "(images (N, C, H, W), say): local path or URI (s3://, gs://, ...)")
    data.add_argument("--target", help="target column (required with --data)")
    data.add_argument("--features", help="comma-separated feature columns (default: every other numeric column)")
    data.add_argument("--task", choices=["regression", "classification"], default="regression")
    data.add_argument("--validation-fraction", type=float, default=None,
                      help="share of the TRAINING rows held out for validation metrics (default 0.1)")
    return data


def default_lr(args, num_rows: int) -> float:
    """The rate for --epochs of --batch-size over num_rows rows when --lr is not given."""
    from ray_ensembles.loop.training import num_steps  # here: the prediction job imports this module too
    from ray_ensembles.loop.training import horizon_lr

    return horizon_lr(num_steps(num_rows, args.batch_size, None, args.epochs))


def load_data(args, allow_no_validation: bool = True):
    """(train, validation) datasets, checked before any Ray work. The toy problem's validation
    set is a fresh sample of the same distribution; a table's or arrays' is carved from its rows."""
    import numpy as np

    from ray_ensembles.loop.data import TensorDataset, cubic_toy, is_arrays_file, read_arrays, read_table, table_to_dataset
    from ray_ensembles.io.locations import check_store

    if args.data is None:
        return cubic_toy(20, args.seed), cubic_toy(1000, args.seed + 1)
    check_store(args.data, "--data")
    if is_arrays_file(args.data):
        if args.target or args.features or getattr(args, "streaming", False):
            raise ValueError("The '--target', '--features' and '--streaming' options are for tables; an .npz "
                             f"file holds the arrays X and y. Got --data {args.data!r} with them instead.")
        arrays = read_arrays(args.data, "--data")
        y = arrays["y"] if args.task == "classification" else np.asarray(arrays["y"], dtype=np.float64)
        dataset = TensorDataset(arrays["X"], y)
    else:
        if not args.target:
            raise ValueError("The '--target' option is required with --data. Got nothing instead.")
        features = args.features.split(",") if args.features else None
        if getattr(args, "streaming", False):
            if args.validation_fraction:
                raise ValueError("The '--validation-fraction' option holds rows out of a table in memory; with "
                                 f"--streaming every row trains. Got {args.validation_fraction} instead.")
            return table_head(args.data, args.target, features, args.task), None
        dataset = table_to_dataset(read_table(args.data), args.target, features, args.task)
    if args.validation_fraction is None:
        args.validation_fraction = 0.1
    if args.validation_fraction == 0 and allow_no_validation:
        return dataset, None
    return dataset.split(args.validation_fraction, seed=args.seed)


def arrow_dataset(location: str):
    """The table at `location` as a pyarrow dataset: its schema, first rows and length (from the
    files' metadata) without reading it, and without Ray."""
    import pyarrow.dataset

    from ray_ensembles.loop.data import table_source

    filesystem, path, fmt = table_source(location)
    return pyarrow.dataset.dataset(path, filesystem=filesystem, format=fmt)


def table_head(location: str, target: str, features, task: str):
    """The first rows of a table to stream, their columns and values checked before Ray starts,
    and every file's column types (a file that disagrees would fail only when its turn came)."""
    from ray_ensembles.loop.data import mismatched_column, table_to_dataset

    mismatch = mismatched_column(location)
    if mismatch:
        raise ValueError(mismatch)
    head = arrow_dataset(location).head(1000)
    if head.num_rows == 0:
        raise ValueError(f"The 'data' file {location!r} has no rows.")
    return table_to_dataset(head, target, features, task)


def read_dataset(location: str):
    """A Ray Dataset of the Parquet or CSV table at `location` (a path or URI), to stream."""
    import ray.data

    from ray_ensembles.loop.data import table_source

    filesystem, path, fmt = table_source(location)
    use_parquet_reader_v1()
    read = ray.data.read_parquet if fmt == "parquet" else ray.data.read_csv
    return read(path, filesystem=filesystem)


def use_parquet_reader_v1():
    """Ray Data's first Parquet reader for this process's reads. The V2 reader (Ray's default)
    asks for 32 footer-reading actors, new processes, for every read: on a 2-CPU machine a read
    of a 50-row file took 1.05 s against 0.07 s (`python -m benchmarks.parquet_readers`). It also
    adds a file-listing task that always asks for a CPU, which the predict job's actors may hold."""
    import ray.data

    ray.data.DataContext.get_current().use_datasource_v2 = False


def add_console_arguments(parser, tracking: bool = True, results: bool = True):
    """--verbose; with `results`, --quiet and --json (a job without a result table has neither); with
    `tracking`, the experiment trackers' options."""
    out = parser.add_argument_group("console and tracking" if tracking else "console")
    out.add_argument("--verbose", action="store_true", help="Ray's own INFO logs on the console too")
    if results:
        out.add_argument("--quiet", action="store_true", help="print only the final table")
        out.add_argument("--json", action="store_true", help="print only the metrics, as one JSON object")
    else:
        parser.set_defaults(quiet=False, json=False)
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

    Unless --verbose, Ray's INFO logs and what its worker processes print stay in its log files
    (the session folder, the dashboard): with another Ray on the machine, Ray Train's own
    placement-group cleaner prints a traceback (its state query cannot tell the two apart), and a
    failure in a worker reaches the job as an exception anyway. A Ray this job starts runs without
    Ray Train's preemption watcher: nothing drains the nodes of a local instance, and the
    watcher's start and shutdown print two internal errors.
    """
    import ray

    from ray_ensembles.on_ray.ray_internals import quiet_ray_data

    quiet_ray_data("INFO" if args.verbose else "WARNING")
    dashboard = None
    if not ray.is_initialized():
        if not args.verbose:
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # reaches only a Ray started here
        options = dict(logging_config=ray.LoggingConfig(log_level="INFO" if args.verbose else "WARNING"),
                       log_to_driver=args.verbose)
        try:
            context = ray.init(**options)
        except ConnectionError as err:  # RAY_ADDRESS or the cluster found does not answer
            fail(f"Could not join Ray: {' '.join(str(err).split())}", status=1)
        except Exception as err:  # Ray raises a bare Exception for a local node that did not start
            if "timed out during startup" not in str(err):
                raise
            ray.shutdown()
            try:  # a machine busy enough to miss Ray's 30 s start-up once rarely misses it twice
                context = ray.init(**options)
            except Exception as again:
                fail(f"Ray did not start on this machine: {' '.join(str(again).split())}", status=1)
        dashboard = context.dashboard_url
    have = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    return (f"Ray at {ray.get_runtime_context().gcs_address}"
            + (f" (dashboard http://{dashboard})" if dashboard else "")
            + f": {nodes} node{'s' * (nodes != 1)}, {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs")


def loggers(args, run_name: str | None = None) -> list:
    """The experiment trackers the options ask for (ray_ensembles.io.tracking), each checked: call
    it before Ray starts."""
    from ray_ensembles.io.tracking import MLflowLogger, TensorBoardLogger

    chosen = []
    if args.mlflow_tracking_uri:
        chosen.append(MLflowLogger(args.mlflow_tracking_uri, experiment_name=args.mlflow_experiment,
                                   run_name=run_name))
    if args.tensorboard_dir:
        chosen.append(TensorBoardLogger(args.tensorboard_dir))
    for logger in chosen:
        try:
            logger.check()
        except ValueError as err:
            raise ValueError(as_option(str(err), type(logger).__name__, {
                "tracking_uri": "--mlflow-tracking-uri", "log_dir": "--tensorboard-dir"})) from None
    return chosen


def num_classes(*datasets) -> int:
    return max(2, max(int(d.y.max()) for d in datasets if d is not None) + 1)


@contextlib.contextmanager
def exclusive_output(output: Path):
    """Hold the folder `output` for this run: a second run writing it at the same time is refused
    (ValueError), so two never interleave their files. The lock is the kernel's, so a run that was
    killed frees it; a folder made here that the run leaves empty is removed."""
    made = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    lock = output / ".ray_ensembles.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"The '--output' option names a folder another run is writing now. Wait for it to "
                         f"end, or choose another folder. Got {str(output)!r} instead.") from None
    try:
        yield
    finally:
        if made and [p.name for p in output.iterdir()] == [lock.name]:
            lock.unlink()
            output.rmdir()
        os.close(fd)


def as_option(message: str, owner: str, options: dict[str, str] | None = None) -> str:
    """A library message about a parameter of `owner` ("The 'x' parameter of owner ..."), naming
    the job's option instead: `options[x]`, or --x with dashes."""
    found = re.match(rf"The '(\w+)' parameter of {re.escape(owner)}", message)
    if not found:
        return message
    option = (options or {}).get(found[1], "--" + found[1].replace("_", "-"))
    return f"The {option!r} option" + message[found.end():]


def resume_command(name: str) -> str:
    """This job's command line, continuing the run called `name`."""
    import shlex

    argv, skip = [], False
    for arg in sys.argv[1:]:  # without a --name or --resume given before
        if skip or arg == "--resume":
            skip = False
            continue
        skip = arg == "--name"
        if not skip and not arg.startswith("--name="):
            argv.append(arg)
    return shlex.join(["python", sys.argv[0], *argv, "--name", name, "--resume"])


def import_callable(spec: str, option: str):
    """The callable an option names as module:function, importable from the working directory."""
    from ray_ensembles.model.validation import import_callable as resolve

    if os.getcwd() not in sys.path:  # as with `python -m`: the job's own folder is sys.path[0]
        sys.path.insert(0, os.getcwd())
    return resolve(spec, f"The {option!r} option")


def fail(message: str, status: int = 2):
    """Exit with one line: the jobs' contract for bad options and data (status 2) and for a store
    that failed during the run (status 1)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
