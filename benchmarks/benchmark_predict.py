#!/usr/bin/env python
"""Throughput and peak memory of jobs/predict.py on a large 13-feature Parquet table, M = 5.

    python -m benchmarks.benchmark_predict [--rows 1000000,10000000,30000000] [--ray-workers 2]

For each size it writes the table (in row groups, never whole in memory), runs the prediction job
in a child process, and samples the memory of that process and its children. Peak memory that
does not grow with the rows shows that the job streams. With --ray-workers it also runs the job
on that many Ray Data actors; there the memory reported is the proportional set size (PSS)
summed over the job's processes, since they share the object store's pages.

Two baselines, both a naive per-member loop (each member's nn.Sequential over all rows in turn,
with torch's threads):
- the naive job: the same work as the job, from the same file to the same columns, run and timed
  the same way (a child process, from Python's start to its exit): read the whole table, loop,
  summarise, write. Its output is checked against the job's.
- the naive loop's compute alone, on 1,000,000 rows already in memory, timed in this process:
  a bound that leaves out the start-up, reading and writing that the job's time includes.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import REPO, unstacked

from ray_ensembles import DeepEnsemble, TensorDataset, Trainer

FEATURES = [f"f{i}" for i in range(13)]
DIMS = [13, 50, 2]  # the members: 13 features -> 50 -> mean and variance
# The naive job holds the whole table and a member's activations in memory: 6.7 GiB at 10M rows.
NAIVE_JOB_MAX_ROWS = 10_000_000


def write_table(path: Path, rows: int, chunk: int = 1_000_000):
    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.int64())] + [(f, pa.float32()) for f in FEATURES])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            cols = {"id": np.arange(start, start + n)} | {f: rng.standard_normal(n, dtype=np.float32) for f in FEATURES}
            writer.write_table(pa.table(cols, schema=schema))


def run_job(command: list[str]) -> tuple[float, float, float]:
    """(seconds, peak RSS, peak PSS) of one run of a Python script; memory in MiB, summed over
    the process and its children."""
    start = time.perf_counter()
    proc = psutil.Popen([sys.executable, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        try:
            memory = [p.memory_full_info() for p in [proc, *proc.children(recursive=True)]]
            peak_rss = max(peak_rss, sum(m.rss for m in memory))
            peak_pss = max(peak_pss, sum(m.pss for m in memory))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read().decode()[-2000:])
    return time.perf_counter() - start, peak_rss / 2 ** 20, peak_pss / 2 ** 20


@torch.no_grad()
def naive_columns(ensemble, nets, X: torch.Tensor, coverage: float = 0.9) -> dict[str, torch.Tensor]:
    """The job's regression columns from a loop over the members, each on all of X."""
    outs = torch.stack([net(ensemble.standardizer.standardize_x(X)) for net in nets])
    y_mean, y_std = ensemble.standardizer.y_mean.float(), ensemble.standardizer.y_std.float()  # the target is float32
    means = outs[..., 0] * y_std + y_mean
    variances = (torch.nn.functional.softplus(outs[..., 1]) + 1e-6) * y_std ** 2
    mean, aleatoric, epistemic = means.mean(0), variances.mean(0), means.var(0, correction=0)
    half = NormalDist().inv_cdf(0.5 + coverage / 2) * (aleatoric + epistemic).sqrt()
    return {"mean": mean, "variance": aleatoric + epistemic, "aleatoric": aleatoric, "epistemic": epistemic,
            f"lower_{coverage:g}": mean - half, f"upper_{coverage:g}": mean + half}


def naive_job(ensemble_dir: str, data: str, output: str):
    """What one writes without the job: read the whole table, run the loop, write the columns."""
    gc.freeze()  # as the job does, so the two differ in their work, not in the interpreter's exit
    ensemble = DeepEnsemble.load(ensemble_dir)
    table = pq.read_table(data)
    X = torch.from_numpy(np.stack([table.column(f).to_numpy() for f in FEATURES], 1))
    columns = naive_columns(ensemble, unstacked(ensemble, DIMS), X)
    pq.write_table(pa.table({"id": table.column("id")} | {k: v.numpy() for k, v in columns.items()}), output)


def naive_rows_per_second(ensemble, rows: int = 1_000_000) -> float:
    """The naive loop's compute alone, on rows already in memory."""
    X, nets = torch.randn(rows, DIMS[0]), unstacked(ensemble, DIMS)
    start = time.perf_counter()
    naive_columns(ensemble, nets, X)
    return rows / (time.perf_counter() - start)


def max_difference(job_output: Path, naive_output: Path) -> float:
    """The largest absolute difference between the two outputs' prediction columns."""
    job, naive = pq.read_table(job_output), pq.read_table(naive_output)
    assert job.column("id").equals(naive.column("id")), "the job and the naive job hold different rows"
    return max(float(np.abs(job.column(c).to_numpy() - naive.column(c).to_numpy()).max())
               for c in naive.column_names if c != "id")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1000000,10000000,30000000")
    p.add_argument("--workdir", default="outputs/benchmark_predict")
    p.add_argument("--batch-size", type=int, default=65536)
    p.add_argument("--ray-workers", type=int, default=0, help="also run the job on this many Ray Data actors")
    p.add_argument("--naive-job", nargs=3, metavar=("ENSEMBLE", "DATA", "OUTPUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.naive_job:
        return naive_job(*args.naive_job)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    e = DeepEnsemble(DIMS[0], 1, num_members=5, hidden_dim=DIMS[1], seed=0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 13, generator=g)
    Trainer(e, TensorDataset(X, X[:, :1] * 2 + torch.randn(2000, 1, generator=g), feature_names=FEATURES),
            train_num_epochs=2, results_folder=work / "train").train()
    e.save(work / "ensemble")
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        data = work / f"table_{rows}.parquet"
        if not data.exists():
            write_table(data, rows)
        output, naive_output = work / f"pred_{rows}", work / f"naive_{rows}.parquet"
        job = [str(REPO / "jobs" / "predict.py"), "--ensemble", str(work / "ensemble"),
               "--data", str(data), "--batch-size", str(args.batch_size)]
        seconds, peak, _ = run_job([*job, "--output", str(output)])
        compute = naive_rows_per_second(e)
        run = {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "peak_rss_mib": peak,
               "naive_compute_rows_per_s": compute, "speedup_vs_naive_compute": rows / seconds / compute}
        line = (f"{rows:>12,} rows: job {seconds:5.1f} s ({rows / seconds:>10,.0f} rows/s, peak RSS {peak:,.0f} MiB); "
                f"naive compute alone {compute:,.0f} rows/s: {run['speedup_vs_naive_compute']:.1f}x")
        if rows <= NAIVE_JOB_MAX_ROWS:
            naive_seconds, naive_peak, _ = run_job(["-m", "benchmarks.benchmark_predict", "--naive-job", str(work / "ensemble"), str(data),
                                                    str(naive_output)])
            run.update(naive_job_seconds=naive_seconds, naive_job_peak_rss_mib=naive_peak,
                       speedup_vs_naive_job=naive_seconds / seconds,
                       max_difference=max_difference(output, naive_output))
            naive_output.unlink()
            line += (f"; naive job {naive_seconds:5.1f} s (peak RSS {naive_peak:,.0f} MiB): "
                     f"{run['speedup_vs_naive_job']:.1f}x; outputs differ by {run['max_difference']:.1e}")
        if args.ray_workers:
            ray_seconds, _, ray_pss = run_job([*job, "--output", str(work / f"ray_{rows}"),
                                               "--num-workers", str(args.ray_workers)])
            run.update(ray_workers=args.ray_workers, ray_seconds=ray_seconds, ray_peak_pss_mib=ray_pss)
            line += f"; on {args.ray_workers} Ray Data actors {ray_seconds:5.1f} s (peak PSS {ray_pss:,.0f} MiB)"
        results.append(run)
        print(line, flush=True)
    (work / "predict_speed.json").write_text(json.dumps({"runs": results}, indent=2))


if __name__ == "__main__":
    main()
