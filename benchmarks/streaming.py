"""Training on tables larger than memory: a Ray Dataset streamed by the workers against the
in-memory path, on generated Parquet tables of UCI width (13 float32 features, one target).

For each table: one epoch of M UCI-sized members (1 x 50) on one Ray Train worker with one
CPU (the other CPU reads: Ray Data's tasks), rows per second per member from the worker's own
training time, and the peak memory of the job: PSS summed over the driver and every process it
started (Ray's included), sampled every 2 s (reading a large process's PSS costs CPU), and the largest single worker's. The in-memory
path trains on the smallest table in the same run.

    python -m benchmarks.streaming                       # 3M, 30M and 100M rows
    python -m benchmarks.streaming --rows 200000 --in-memory-rows 200000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.common import RESULTS, fail

NUM_FEATURES = 13
ROWS_PER_FILE = 1_000_000


def generate(folder: Path, rows: int, seed: int = 0) -> Path:
    """A folder of Parquet files of `rows` rows (kept between runs): y = x . w + sin(x0) + noise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = folder / f"rows-{rows}"
    done = table / "_complete"
    if done.exists():
        return table
    table.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = rng.normal(size=NUM_FEATURES).astype(np.float32)
    for k, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        x = rng.standard_normal((n, NUM_FEATURES), dtype=np.float32)
        y = x @ w + np.sin(x[:, 0]) + 0.3 * rng.standard_normal(n, dtype=np.float32)
        columns = {f"x{i}": x[:, i] for i in range(NUM_FEATURES)} | {"y": y}
        pq.write_table(pa.table(columns), table / f"part-{k:05d}.parquet")
    done.touch()
    return table


class PeakMemory:
    """Peak PSS of this process and all its descendants (Ray's processes, when this process
    started Ray), summed, with each process's share at that moment, and of the largest process
    at any time, sampled on a thread."""

    def __init__(self, interval: float = 2.0):
        self.interval, self._stop = interval, threading.Event()
        self.peak_total, self.peak_process, self.at_peak = 0, (0, ""), {}

    def sample(self) -> dict[str, int]:
        """PSS per process, keyed by pid and name."""
        me = psutil.Process()
        shares = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                shares[f"{p.pid} {' '.join(p.cmdline()[:1])[-30:]}"] = p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return shares

    def _run(self):
        while not self._stop.is_set():
            shares = self.sample()
            if sum(shares.values()) > self.peak_total:
                self.peak_total, self.at_peak = sum(shares.values()), shares
            self.peak_process = max(self.peak_process, *((v, k) for k, v in shares.items()))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def train_one(table: Path, streaming: bool, args) -> dict:
    import ray
    from ray.train import ScalingConfig

    from ray_ensembles import DeepEnsemble, Trainer
    from ray_ensembles.loop.data import read_table, table_to_dataset

    features = [f"x{i}" for i in range(NUM_FEATURES)]
    ensemble = DeepEnsemble(NUM_FEATURES, num_members=args.members, hidden_dim=50, seed=0)
    options = dict(train_batch_size=args.batch_size, train_num_epochs=1, train_lr=1e-3, save_every=10 ** 9,
                   results_folder=args.folder / "runs", shuffle_buffer_rows=args.shuffle_buffer_rows,
                   scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}))
    started = time.time()
    with PeakMemory() as memory:
        if streaming:
            trainer = Trainer(ensemble, ray.data.read_parquet(str(table)), target="y", features=features, **options)
        else:
            trainer = Trainer(ensemble, table_to_dataset(read_table(str(table)), "y", features), **options)
        trainer.train()
    steps = trainer.settings.num_steps
    return {"path": "streaming" if streaming else "in memory", "rows": len(trainer.dataset),
            "table_gb": sum(f.stat().st_size for f in table.glob("*.parquet")) / 1e9,
            "steps": steps, "train_s": trainer.timings["training_s"], "data_wait_s": trainer.timings["data_wait_s"], "total_s": time.time() - started,
            "rows_per_s_per_member": steps * args.batch_size / trainer.timings["training_s"],
            "peak_job_pss_gb": memory.peak_total / 1e9, "peak_process_pss_gb": memory.peak_process[0] / 1e9,
            "peak_process": memory.peak_process[1],
            "pss_mb_at_peak": {k: round(v / 1e6) for k, v in sorted(memory.at_peak.items(), key=lambda kv: -kv[1])},
            "train_loss": float(np.mean(
                [m["train_loss"] for m in trainer.metrics["members"].values()]))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="3000000,30000000,100000000", help="comma-separated table lengths to stream")
    p.add_argument("--in-memory-rows", type=int, default=3_000_000, help="the in-memory path's table (0: none)")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--shuffle-buffer-rows", type=int, default=1 << 20)
    p.add_argument("--folder", type=Path, default=Path("/tmp/ray_ensembles_streaming"),
                   help="where the generated tables go (outside the repository)")
    p.add_argument("--output", type=Path, default=RESULTS / "streaming.json")
    args = p.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",") if r]
    except ValueError:
        fail(f"The '--rows' option must be comma-separated integers. Got {args.rows!r} instead.")
    if not rows or min(rows) < 1 or args.in_memory_rows < 0:
        fail(f"The '--rows' and '--in-memory-rows' options must be positive. Got {args.rows!r}, {args.in_memory_rows}.")

    import ray
    from ray_ensembles.on_ray.ray_internals import quiet_ray_data

    tables = {n: generate(args.folder, n) for n in sorted({*rows, args.in_memory_rows} - {0})}
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    quiet_ray_data("WARNING")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    time.sleep(2)
    idle_gb = sum(PeakMemory().sample().values()) / 1e9
    results = [train_one(tables[n], True, args) for n in rows]
    if args.in_memory_rows:
        results.append(train_one(tables[args.in_memory_rows], False, args))
    ray.shutdown()

    print(f"\nM = {args.members} members of 1 x 50, batch {args.batch_size}, one epoch, 1 Ray Train worker (1 CPU); "
          f"shuffle buffer {args.shuffle_buffer_rows} rows; Ray idle: {idle_gb:.2f} GB PSS")
    print(f"{'path':>10} {'rows':>12} {'table GB':>9} {'rows/s/member':>14} {'train s':>8} {'waiting s':>9} "
          f"{'peak job PSS GB':>16} {'peak process GB':>16}  process")
    for r in results:
        print(f"{r['path']:>10} {r['rows']:>12,} {r['table_gb']:>9.2f} {r['rows_per_s_per_member']:>14,.0f} "
              f"{r['train_s']:>8.1f} {r['data_wait_s']:>9.1f} {r['peak_job_pss_gb']:>16.2f} {r['peak_process_pss_gb']:>16.2f}  {r['peak_process']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "ray_idle_pss_gb": idle_gb,
                                       "results": results}, indent=2))
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
