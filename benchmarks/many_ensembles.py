#!/usr/bin/env python
"""Many small ensembles: what Ray's start-up costs each way, on Boston-sized data (455 x 13).

    python -m benchmarks.many_ensembles

1. fit_many's per-ensemble overhead on a warm pool (1-member, 1-step ensembles), and its
   scaling from 1 to 2 actors on UCI-sized ensembles (M = 5, 50 hidden units, 40 epochs).
2. A 12-trial Tune sweep (M in {1, 2, 3, 5} x eps in {0, 0.01, 0.02}) with each trial a Ray
   Train run and with each trial in its own process; the scores must be identical.
Writes benchmarks/results/many_ensembles.json. One Ray Train fit against Ray Train's own floor
is benchmarks/ray_fit_floor.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from benchmarks.common import RESULTS

from ray_ensembles import DeepEnsemble, EnsemblePool, TensorDataset

G = torch.Generator().manual_seed(0)
X = torch.randn(455, 13, generator=G)
Y = X[:, :1] * X[:, 1:2] + X[:, 2:3].sin() + 0.3 * torch.randn(455, 1, generator=G)
UCI = {"train_num_epochs": 40, "train_batch_size": 100, "train_lr": 0.1}


def uci_ensemble(seed: int, members: int = 5) -> DeepEnsemble:
    return DeepEnsemble(13, 1, num_members=members, hidden_dim=50, seed=seed)


def pool_figures(count: int, tiny_count: int) -> dict:
    out = {}
    jobs = {k: (uci_ensemble(k), TensorDataset(X, Y)) for k in range(count)}
    for actors in (1, 2):
        with EnsemblePool(actors) as pool:
            pool.fit_many({0: jobs[0]}, **UCI)  # warm: torch and the package imported
            start = time.perf_counter()
            results = pool.fit_many(jobs, **UCI)
            out[f"uci_{actors}_actors_s"] = time.perf_counter() - start
            if actors == 2:
                tiny = {k: (uci_ensemble(k, members=1), TensorDataset(X, Y)) for k in range(tiny_count)}
                start = time.perf_counter()
                done = pool.fit_many(tiny, train_num_steps=1)
                wall = time.perf_counter() - start
                out.update(tiny_wall_per_ensemble_ms=1e3 * wall / tiny_count,
                           tiny_actor_ms_per_ensemble=1e3 * wall * actors / tiny_count,
                           tiny_in_fit_ms=1e3 * statistics.fmean(r.worker_s for r in done.values()))
        out[f"uci_{actors}_actors_worker_s"] = sum(r.worker_s for r in results.values())
    out["scaling_1_to_2"] = out["uci_1_actors_s"] / out["uci_2_actors_s"]
    return out


def sweep_figures() -> dict:
    from ray_ensembles.sweep import tune_ensemble

    out, tables = {}, {}
    dataset = TensorDataset(X, Y)
    for training in ("ray_train", "in_trial"):
        start = time.perf_counter()
        result = tune_ensemble(dataset, {"num_members": [1, 2, 3, 5], "adversarial_eps": [0.0, 0.01, 0.02]},
                               trial_training=training, storage_path=tempfile.mkdtemp(prefix="sweep-"),
                               name=training, ensemble_options={"hidden_dim": 50}, trainer_options=UCI)
        out[f"{training}_s"] = time.perf_counter() - start
        tables[training] = {(r["num_members"], r["adversarial_eps"]): r["val_nll"] for r in result.table}
    out["speedup"] = out["ray_train_s"] / out["in_trial_s"]
    gaps = [abs(tables["ray_train"][k] - tables["in_trial"][k]) for k in tables["ray_train"]]
    out["max_val_nll_difference"] = max(gaps)
    out["trials"] = len(gaps)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ensembles", type=int, default=24, help="UCI-sized ensembles for the scaling figure")
    p.add_argument("--tiny", type=int, default=200, help="1-step ensembles for the overhead figure")
    args = p.parse_args(argv)

    import ray
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {"ray_start_s": time.perf_counter() - start}
    results["pool"] = pool_figures(args.ensembles, args.tiny)
    print(results["pool"], flush=True)
    results["sweep"] = sweep_figures()
    print(results["sweep"], flush=True)
    ray.shutdown()

    pool, sweep = results["pool"], results["sweep"]
    print(f"""
| figure | measured | goal |
|---|---|---|
| fit_many, warm pool of 2: wall per 1-step ensemble | {pool['tiny_wall_per_ensemble_ms']:.1f} ms ({pool['tiny_actor_ms_per_ensemble']:.1f} ms of an actor, {pool['tiny_in_fit_ms']:.1f} ms of it in the Trainer) | < 50 ms |
| fit_many, {args.ensembles} UCI-sized ensembles: 1 actor / 2 actors | {pool['uci_1_actors_s']:.2f} s / {pool['uci_2_actors_s']:.2f} s ({pool['scaling_1_to_2']:.2f}x) | |
| 12-trial sweep: Ray Train trials / in-trial | {sweep['ray_train_s']:.1f} s / {sweep['in_trial_s']:.1f} s ({sweep['speedup']:.1f}x) | >= 3x |
| 12-trial sweep: largest val NLL difference | {sweep['max_val_nll_difference']:.2g} | identical |
""")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "many_ensembles.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
