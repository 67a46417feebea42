#!/usr/bin/env python
"""Load test: many jobs at once on one small Ray head, with nothing lost and memory bounded.

    python -m benchmarks.load_test               # 16 members on 2 workers + 4 sweeps + Ray Data predict
    python -m benchmarks.load_test --smoke-test  # 4 members + 2 sweeps + predict, about 3 minutes

It starts its own local Ray head (2 CPUs, like this machine), submits every job with
`ray job submit --no-wait`, and waits for all of them. The jobs compete for the same 2 CPUs:
Ray Train workers, Tune trials and Ray Data read tasks and actors all queue for them, so a
scheduling deadlock would show as a job that never finishes (`--timeout`). Then it checks that
nothing was lost: every member of the ensemble, every trial of every sweep, every prediction row.
While the jobs run it samples the memory of the head's whole process tree (drivers and workers
included) and of the machine. The figures go to `--output`/load_test.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.job_submission import JobStatus, JobSubmissionClient

from tests.ray_head import local_ray_head
from ray_ensembles import DeepEnsemble, TensorDataset, Trainer

JOBS = Path(__file__).resolve().parent


def write_table(path: Path, rows: int, features: int = 13, seed: int = 0):
    """A regression table with an id column: y is a noisy nonlinear function of the features."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, features)).astype(np.float32)
    y = np.sin(X[:, 0]) + X[:, 1] * X[:, 2] + 0.1 * rng.standard_normal(rows).astype(np.float32)
    columns = {"id": np.arange(rows), **{f"x{i}": X[:, i] for i in range(features)}, "y": y}
    pq.write_table(pa.table(columns), path)
    return X, y


def submit(address: str, env: dict, entrypoint: list[str]) -> str:
    proc = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
                           "--no-wait", "--", *entrypoint], env=env, capture_output=True, text=True,
                          check=True)
    return re.search(r"raysubmit_\w+", proc.stdout + proc.stderr).group(0)


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=16)
    p.add_argument("--sweeps", type=int, default=4)
    p.add_argument("--rows", type=int, default=20_000, help="rows of the shared training table")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1800, help="seconds before calling it a deadlock")
    p.add_argument("--output", default="outputs/load_test")
    p.add_argument("--smoke-test", action="store_true")
    args = p.parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) ends the run through SystemExit, so the head it started is
    # stopped too: Python runs no `finally` blocks on an unhandled SIGTERM
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.smoke_test:
        args.members, args.sweeps, args.rows, args.epochs = 4, 2, 2_000, 1
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    table = out / "table.parquet"
    X, y = write_table(table, args.rows)

    # the prediction job needs an ensemble before the others start: train a small one in-process
    small = DeepEnsemble(X.shape[1], num_members=3, seed=1)
    Trainer(small, TensorDataset(torch.from_numpy(X), torch.from_numpy(y)[:, None],
                                 feature_names=[f"x{i}" for i in range(X.shape[1])]),
            train_batch_size=100, train_num_epochs=1, results_folder=out / "small").train()
    small.save(out / "small_ensemble")

    python = sys.executable
    data = ["--data", str(table), "--target", "y", "--features", ",".join(f"x{i}" for i in range(X.shape[1]))]
    jobs = {"train": [python, str(JOBS / "train_ensemble.py"), *data, "--num-members", str(args.members),
                      "--num-workers", "2", "--epochs", str(args.epochs), "--output", str(out / "train"),
                      "--name", "load-train"]}
    for k in range(args.sweeps):
        jobs[f"sweep{k}"] = [python, str(JOBS / "tune_ensemble.py"), *data, "--num-members", "2,3",
                             "--adversarial-eps", "0,0.01", "--epochs", str(args.epochs), "--seed", str(k),
                             "--cpus-per-worker", "0.5",
                             "--output", str(out / f"sweep{k}"), "--name", f"load-sweep{k}"]
    jobs["predict"] = [python, str(JOBS / "predict.py"), "--ensemble", str(out / "small_ensemble"),
                       "--data", str(table), "--output", str(out / "predictions.parquet"),
                       "--num-workers", "1", "--batch-size", "1000"]

    baseline = psutil.virtual_memory().used
    with local_ray_head(num_cpus=2) as (address, env, head):
        os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})  # the client below sends the token
        head_process = psutil.Process(head.pid)
        idle_rss = tree_rss(head_process)
        start = time.time()
        ids = {name: submit(address, env, entrypoint) for name, entrypoint in jobs.items()}
        client = JobSubmissionClient(address)
        status, finished, peak_rss, peak_used = {}, {}, idle_rss, 0
        while len(finished) < len(ids) and time.time() - start < args.timeout:
            for name, job_id in ids.items():
                if name not in finished:
                    status[name] = client.get_job_status(job_id)
                    if status[name] in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                        finished[name] = time.time() - start
            peak_rss = max(peak_rss, tree_rss(head_process))
            peak_used = max(peak_used, psutil.virtual_memory().used - baseline)
            time.sleep(1)
        logs = {name: client.get_job_logs(job_id) for name, job_id in ids.items()}
    wall = time.time() - start
    for name, log in logs.items():
        (out / f"{name}.log").write_text(log)

    # nothing lost: every member, every trial, every row
    checks = {}
    if status.get("train") == JobStatus.SUCCEEDED:
        ensemble = DeepEnsemble.load(out / "train" / "ensemble")
        pred = ensemble(torch.from_numpy(X[:1000]))
        checks["train"] = (ensemble.member_ids == list(range(args.members))
                           and bool(torch.isfinite(pred.mean).all() and torch.isfinite(pred.variance).all()))
    for k in range(args.sweeps):
        name = f"sweep{k}"
        if status.get(name) == JobStatus.SUCCEEDED:
            with open(out / name / "trials.csv") as f:
                trials = list(csv.DictReader(f))
            checks[name] = (len(trials) == 4 and all(np.isfinite(float(t["val_nll"])) for t in trials)
                            and (out / name / "best_ensemble" / "manifest.json").exists())
    if status.get("predict") == JobStatus.SUCCEEDED:
        predictions = pq.read_table(out / "predictions.parquet")
        checks["predict"] = (sorted(predictions.column("id").to_pylist()) == list(range(args.rows))
                             and bool(np.isfinite(predictions.column("mean").to_numpy()).all()))

    result = {"jobs": {name: {"status": str(status.get(name)), "finished_after_s": finished.get(name),
                              "nothing_lost": checks.get(name, False)} for name in jobs},
              "members": args.members, "sweeps": args.sweeps, "rows": args.rows, "cpus": 2,
              "wall_s": wall, "deadlocked": len(finished) < len(ids),
              "idle_head_rss_mib": idle_rss / 2 ** 20, "peak_tree_rss_mib": peak_rss / 2 ** 20,
              "peak_machine_used_delta_mib": peak_used / 2 ** 20,
              "machine_total_mib": psutil.virtual_memory().total / 2 ** 20}
    (out / "load_test.json").write_text(json.dumps(result, indent=2))
    print("\n| job | status | finished after (s) | nothing lost |\n|---|---|---|---|")
    for name, r in result["jobs"].items():
        after = f"{r['finished_after_s']:.0f}" if r["finished_after_s"] is not None else "-"
        print(f"| {name} | {r['status']} | {after} | {'yes' if r['nothing_lost'] else 'NO'} |")
    print(f"\n{len(jobs)} jobs on 2 CPUs in {wall:.0f} s; peak RSS of the Ray process tree "
          f"{result['peak_tree_rss_mib']:,.0f} MiB (idle head {result['idle_head_rss_mib']:,.0f} MiB); "
          f"machine memory in use rose by at most {result['peak_machine_used_delta_mib']:,.0f} MiB "
          f"of {result['machine_total_mib']:,.0f} MiB")
    if result["deadlocked"] or not all(r["nothing_lost"] for r in result["jobs"].values()):
        sys.exit(f"load test failed: see {out}/*.log")


if __name__ == "__main__":
    main()
