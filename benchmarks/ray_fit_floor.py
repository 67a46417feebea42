#!/usr/bin/env python
"""One Ray Train fit of a UCI-sized ensemble against Ray Train's own floor.

    python -m benchmarks.ray_fit_floor [--reps 3]

With the same 2 workers, interleaved, `reps` rounds of: an empty training function (Ray Train's
floor), one that only imports what our workers import (torch and this package), and our
`Trainer(..., scaling_config=ScalingConfig(num_workers=2))` fit (M = 5, 50 hidden units, 455 x 13,
40 epochs) with its `timings`. Twice: on a local Ray that this process starts (plain Python after
`ray.init()`), and through a driver connected to a running `ray start` head (the `ray job submit`
case). Writes benchmarks/results/ray_fit_floor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from benchmarks.common import REPO, RESULTS

UCI = {"train_num_epochs": 40, "train_batch_size": 100, "train_lr": 0.1}


def empty(config):
    pass


def imports_only(config):
    import torch  # noqa: F401

    import ray_ensembles.on_ray.distributed  # noqa: F401


def rounds(reps: int) -> dict:
    """Interleaved fits on the Ray this process is connected to; every row and the medians."""
    import torch
    from ray.train import BackendConfig, LoggingConfig, RunConfig, ScalingConfig

    from ray_ensembles import DeepEnsemble, TensorDataset, Trainer
    from ray_ensembles.on_ray.distributed import POLL_DEFAULT_S, POLL_ENV, env_default
    from ray_ensembles.on_ray.ray_internals import data_parallel_trainer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(455, 13, generator=g)
    y = x[:, :1] * x[:, 1:2] + x[:, 2:3].sin() + 0.3 * torch.randn(455, 1, generator=g)
    folder = tempfile.mkdtemp(prefix="ray-fit-floor-")
    rows = []
    for rep in range(reps):
        row = {}
        for name, function in (("empty_fit_s", empty), ("imports_only_fit_s", imports_only)):
            start = time.perf_counter()
            with env_default(POLL_ENV, POLL_DEFAULT_S):  # the poll our fits use
                data_parallel_trainer()(function, backend_config=BackendConfig(),
                                        scaling_config=ScalingConfig(num_workers=2),
                                        run_config=RunConfig(name=f"{name}-{rep}", storage_path=folder,
                                                             logging_config=LoggingConfig(log_level="WARNING"))).fit()
            row[name] = time.perf_counter() - start
        trainer = Trainer(DeepEnsemble(13, num_members=5, hidden_dim=50, seed=rep), TensorDataset(x, y), **UCI,
                          results_folder=folder, scaling_config=ScalingConfig(num_workers=2))
        start = time.perf_counter()
        trainer.train()
        row["our_fit_s"] = time.perf_counter() - start
        row.update(trainer.timings)
        rows.append(row)
        print({k: round(v, 2) for k, v in row.items()}, flush=True)
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"reps": rows, "median": median, "ours_above_floor_s": median["our_fit_s"] - median["empty_fit_s"],
            "imports_above_floor_s": median["imports_only_fit_s"] - median["empty_fit_s"]}


def on_a_cluster(reps: int) -> dict:
    """The same rounds in a job submitted to a `ray start` head on this machine."""
    import subprocess

    from tests.ray_head import BIN, local_ray_head

    with local_ray_head(num_cpus=2) as (address, env, _):
        done = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                               "python", "-m", "benchmarks.ray_fit_floor", "--driver", "--reps", str(reps)],
                              env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stdout[-4000:] + done.stderr[-2000:])
    return json.loads(next(line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds of the three fits")
    p.add_argument("--where", choices=["local", "cluster", "both"], default="both")
    p.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)  # the cluster case's driver
    args = p.parse_args(argv)
    import ray

    if args.driver:  # connected to the head the parent started: print the figures for it
        ray.init()
        print("RESULT " + json.dumps(rounds(args.reps)), flush=True)
        return

    results = {}
    if args.where != "cluster":
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        results["local"] = rounds(args.reps)
        ray.shutdown()
    if args.where != "local":
        results["cluster"] = on_a_cluster(args.reps)
    print("\n| Ray | empty fit | imports only | our fit | ours above the empty fit (imports) |\n|---|---|---|---|---|")
    for where, figures in results.items():
        m = figures["median"]
        print(f"| {where} | {m['empty_fit_s']:.1f} s | {m['imports_only_fit_s']:.1f} s | {m['our_fit_s']:.1f} s | "
              f"{figures['ours_above_floor_s']:.1f} s ({figures['imports_above_floor_s']:.1f} s) |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ray_fit_floor.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
