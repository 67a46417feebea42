#!/usr/bin/env python
"""Throughput and peak memory of jobs/predict.py on a large 13-feature Parquet table, M = 5.

    python jobs/benchmark_predict.py --rows 1000000,10000000

For each size it writes the table (in row groups, never whole in memory), runs the prediction job
in a child process, and samples that process's resident memory. Peak memory that does not grow
with the rows shows that the job streams. It also times a naive per-member loop on 1,000,000 rows
held in memory, as the baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ray_ensembles import DeepEnsemble, TensorDataset, Trainer

FEATURES = [f"f{i}" for i in range(13)]


def write_table(path: Path, rows: int, chunk: int = 1_000_000):
    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.int64())] + [(f, pa.float32()) for f in FEATURES])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            cols = {"id": np.arange(start, start + n)} | {f: rng.standard_normal(n, dtype=np.float32) for f in FEATURES}
            writer.write_table(pa.table(cols, schema=schema))


def run_job(ensemble: Path, data: Path, output: Path, extra: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB of the job and its children)."""
    start = time.perf_counter()
    proc = psutil.Popen([sys.executable, str(Path(__file__).with_name("predict.py")), "--ensemble", str(ensemble),
                         "--data", str(data), "--output", str(output), *extra],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read().decode()[-2000:])
    return time.perf_counter() - start, peak / 2 ** 20


def naive_rows_per_second(ensemble, rows: int = 1_000_000) -> float:
    X = torch.randn(rows, 13)
    nets = [torch.nn.Sequential(torch.nn.Linear(13, 50), torch.nn.ReLU(), torch.nn.Linear(50, 2)) for _ in range(5)]
    start = time.perf_counter()
    with torch.no_grad():
        outs = torch.stack([net((X - ensemble.x_mean) / ensemble.x_std) for net in nets])
        mean, var = outs[..., :1], torch.nn.functional.softplus(outs[..., 1:]) + 1e-6
        mean.mean(0), (var + mean ** 2).mean(0) - mean.mean(0) ** 2
    return rows / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1000000,10000000")
    p.add_argument("--workdir", default="outputs/benchmark_predict")
    p.add_argument("--batch-size", type=int, default=65536)
    args = p.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    e = DeepEnsemble(13, 1, num_members=5, hidden_dim=50, seed=0)
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
        naive = naive_rows_per_second(e)
        seconds, peak = run_job(work / "ensemble", data, work / f"pred_{rows}", ["--batch-size", str(args.batch_size)])
        results.append({"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "peak_rss_mib": peak,
                        "naive_rows_per_s": naive, "speedup_vs_naive": rows / seconds / naive})
        print(f"{rows:>12,} rows: {seconds:7.1f} s, {rows / seconds:>12,.0f} rows/s, peak RSS {peak:,.0f} MiB; "
              f"naive loop {naive:,.0f} rows/s (compute only): {rows / seconds / naive:.1f}x", flush=True)
    (work / "predict_speed.json").write_text(json.dumps({"runs": results}, indent=2))


if __name__ == "__main__":
    main()
