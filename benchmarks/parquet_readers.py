#!/usr/bin/env python
"""Ray Data's two Parquet readers on this machine: seconds per read, and the processes a read starts.

    python -m benchmarks.parquet_readers [--reps 5]

On a local Ray with 2 CPUs, interleaved, `reps` rounds of `ray.data.read_parquet` and
every batch of it for each reader (`DataContext.use_datasource_v2` False and True) and table (one
file of 50 rows; 4 files of 250,000 rows of 14 float32 columns). The first round of each reader
is reported apart (its worker processes are new). Also counts the Ray worker processes that one
read of the small table starts. The jobs read with the first reader (`jobs/common.py`).
Writes benchmarks/results/parquet_readers.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import RESULTS

READERS = {"v1": False, "v2": True}


def write_tables(folder: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    (folder / "small").mkdir()
    pq.write_table(pa.table({"a": np.arange(50.0), "y": np.arange(50.0)}), folder / "small" / "part-0.parquet")
    (folder / "large").mkdir()
    for k in range(4):
        columns = {f"x{i}": rng.normal(size=250_000).astype(np.float32) for i in range(13)}
        pq.write_table(pa.table({**columns, "y": rng.normal(size=250_000).astype(np.float32)}),
                       folder / "large" / f"part-{k}.parquet")
    return {"50 rows, 1 file": str(folder / "small"), "1M rows, 4 files": str(folder / "large")}


def read_seconds(path: str, v2: bool) -> float:
    import ray.data

    ray.data.DataContext.get_current().use_datasource_v2 = v2
    start = time.perf_counter()
    rows = sum(len(batch["y"]) for batch in ray.data.read_parquet(path).iter_batches(batch_size=None))
    assert rows in (50, 1_000_000), rows
    return time.perf_counter() - start


def worker_pids() -> set[int]:
    import psutil

    def is_worker(cmdline: str) -> bool:  # named ray::<task or actor>, or still starting
        return cmdline.startswith("ray::") or "default_worker.py" in cmdline

    return {p.pid for p in psutil.process_iter(["cmdline"]) if is_worker(" ".join(p.info["cmdline"] or []))}


def processes_started(path: str, v2: bool) -> int:
    """How many Ray worker processes that did not exist before one read appear while it runs."""
    import threading

    before, seen, done = worker_pids(), set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.update(worker_pids())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    read_seconds(path, v2)
    done.set()
    watcher.join()
    return len(seen - before)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        tables = write_tables(Path(tmp))
        times = {(table, reader): [] for table in tables for reader in READERS}
        for _ in range(args.reps):
            for table, path in tables.items():
                for reader, v2 in READERS.items():
                    times[table, reader].append(read_seconds(path, v2))
        started = {reader: processes_started(tables["50 rows, 1 file"], v2) for reader, v2 in READERS.items()}
    ray.shutdown()
    rows = [{"table": table, "reader": reader, "first_read_s": round(ts[0], 3),
             "median_read_s": round(statistics.median(ts[1:]), 3), "reads": len(ts)}
            for (table, reader), ts in times.items()]
    print("| table | reader | first read s | median read s, rounds 2+ |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['table']} | {r['reader']} | {r['first_read_s']:.2f} | {r['median_read_s']:.2f} |")
    print("new Ray worker processes during one read of the small table: "
          + ", ".join(f"{reader} {n}" for reader, n in started.items()))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "parquet_readers.json").write_text(json.dumps({"rows": rows, "processes_started": started}, indent=1))


if __name__ == "__main__":
    main()
