#!/usr/bin/env python
"""The same training job on a two-node cluster, with its run storage on S3 and on local disk.

    python -m benchmarks.s3_cluster               # 2 rounds of each, interleaved
    python -m benchmarks.s3_cluster --rounds 1

It starts what tests/test_e2e.py starts: moto's S3 server in this process, a head and a second
node (`ray start --address`, 2 CPUs each, token authentication on), then submits
`jobs/train_ensemble.py` (2 members on 2 workers, one per node, 600 steps, 20 checkpoints) with
`--storage-path s3://...` and with `--storage-path <local folder>`, in turn. For each run: the
wall time of `ray job submit`, the job's own timings, and for S3 the bytes of one checkpoint
and the requests the store received per checkpoint. Results go to benchmarks/results/s3_cluster.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import REPO, RESULTS
from tests.ray_head import BIN, local_ray_head
from tests.s3_store import s3_store

STEPS, SAVE_EVERY = 600, 30
JOB = ["jobs/train_ensemble.py", "--target", "y", "--features", "a,b,c", "--num-members", "2", "--num-workers", "2",
       "--cpus-per-worker", "2", "--epochs", "24", "--batch-size", "10", "--lr", "0.01",
       "--save-every", str(SAVE_EVERY), "--json"]


def run(address, env, *argv) -> tuple[float, dict]:
    started = time.perf_counter()
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
                           "--", "python", *JOB, *argv], env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(output[-3000:])
    (line,) = [line for line in output.splitlines() if line.startswith('{"metrics"')]
    return wall, json.loads(line)["timings"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(250, 3)).astype(np.float32)
    rows = {"s3": [], "local": []}
    with tempfile.TemporaryDirectory() as tmp, s3_store() as store, \
            local_ray_head(num_cpus=2, num_nodes=2, env=store.env) as (address, env, _):
        table = Path(tmp) / "train.parquet"
        pq.write_table(pa.table({"a": X[:, 0], "b": X[:, 1], "c": X[:, 2], "y": X[:, 0] - X[:, 2] ** 2}), table)
        store.client().upload_file(str(table), store.bucket, "data/train.parquet")
        for k in range(args.rounds):
            for kind in ("s3", "local"):
                name = f"{kind}{k}"
                if kind == "s3":
                    requests = len(store.log)
                    wall, timings = run(address, env, "--data", store.uri("data/train.parquet"),
                                        "--storage-path", store.uri("runs"), "--name", name, "--output", f"{tmp}/{name}")
                    checkpoints = {key.split("/")[2] for key in store.keys(f"runs/{name}/") if "/checkpoint_" in key}
                    one = min(checkpoints)
                    row = {"requests_per_checkpoint": (len(store.log) - requests) / len(checkpoints),
                           "checkpoint_bytes": sum(size for key, size in store.keys(f"runs/{name}/{one}/").items()),
                           "checkpoint_files": len(store.keys(f"runs/{name}/{one}/")), "checkpoints": len(checkpoints)}
                else:
                    wall, timings = run(address, env, "--data", str(table), "--storage-path", f"{tmp}/runs",
                                        "--name", name, "--output", f"{tmp}/{name}")
                    row = {}
                rows[kind].append({"wall_s": wall, **timings, **row})
                print(kind, {k: round(v, 2) for k, v in rows[kind][-1].items()}, flush=True)

    columns = ["wall_s", "worker_start_s", "training_s", "checkpoint_s", "ray_train_total_s", "assembly_s"]
    medians = {kind: {c: statistics.median(r[c] for r in runs) for c in columns} for kind, runs in rows.items()}
    print(f"\n{'storage':>8} " + " ".join(f"{c:>18}" for c in columns))
    for kind, values in medians.items():
        print(f"{kind:>8} " + " ".join(f"{values[c]:>18.2f}" for c in columns))
    s3 = rows["s3"][-1]
    print(f"\nS3, per checkpoint: {s3['checkpoint_files']} files, {s3['checkpoint_bytes']:,} bytes written; "
          f"{statistics.median(r['requests_per_checkpoint'] for r in rows['s3']):.0f} requests to the store "
          f"(the run's requests over its checkpoints: Ray Train's own files and the final ensemble included)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "s3_cluster.json").write_text(json.dumps({"steps": STEPS, "save_every": SAVE_EVERY, "runs": rows,
                                                         "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
