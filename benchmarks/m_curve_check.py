#!/usr/bin/env python
"""Does the cheap M curve (member subsets of ONE ensemble) agree with a real sweep over M?

    python -m benchmarks.m_curve_check --dataset bostonHousing --seeds 3

On one UCI split, with the validation part carved from its training rows: a real Ray Tune sweep
trains a separate ensemble for every (M, seed); the M curve trains one ensemble of max(M) members
per seed and scores member subsets. Both are averaged over seeds; the seed-to-seed standard
deviation of the real sweep is the run-to-run spread the two are compared against.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import torch
from benchmarks.common import REPO, load_uci

from ray_ensembles import DeepEnsemble, TensorDataset, Trainer
from ray_ensembles.sweep import m_curve, tune_ensemble


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "uci"))
    p.add_argument("--dataset", default="bostonHousing")
    p.add_argument("--num-members", default="1,2,3,5")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--output", default="outputs/m_curve_check")
    args = p.parse_args(argv)
    sizes = [int(m) for m in args.num_members.split(",")]

    data, features, target, splits = load_uci(Path(args.data_dir) / args.dataset, 1)
    rows = torch.from_numpy(splits[0][0].copy())  # split 0's TRAINING rows only
    X = torch.tensor(data[:, features], dtype=torch.float32)[rows]
    y = torch.tensor(data[:, [target]], dtype=torch.float32)[rows]
    train, validation = TensorDataset(X, y).split(0.2, seed=0)
    # the plain NLL at a constant rate, as its results in docs/usage.md were measured
    options = dict(train_num_epochs=args.epochs, train_lr=args.lr, train_batch_size=100, lr_scheduler=False)
    output = Path(args.output)

    sweep = tune_ensemble(train, {"num_members": sizes, "seed": list(range(args.seeds))},
                          validation_dataset=validation, trainer_options=options, num_reports=1,
                          ensemble_options={"nll_beta": 0.0},
                          cpus_per_worker=0.5, max_workers_per_trial=2, storage_path=output / "runs")
    curves = []
    for seed in range(args.seeds):
        ensemble = DeepEnsemble(X.shape[1], num_members=max(sizes), seed=seed)
        Trainer(ensemble, train, results_folder=output / "m_curve", save_every=10 ** 9, **options).train()
        curves.append({r["num_members"]: r["val_nll_mean"] for r in m_curve(ensemble, validation.X, validation.y)})

    table = []
    for m in sizes:
        real = [r["val_nll"] for r in sweep.table if r["num_members"] == m]
        cheap = [c[m] for c in curves]
        spread = statistics.stdev(real) if len(real) > 1 else 0.0
        table.append({"num_members": m, "sweep_val_nll_mean": statistics.fmean(real), "sweep_val_nll_std": spread,
                      "m_curve_val_nll_mean": statistics.fmean(cheap),
                      "difference": statistics.fmean(cheap) - statistics.fmean(real),
                      "within_spread": abs(statistics.fmean(cheap) - statistics.fmean(real)) <= spread})
    output.mkdir(parents=True, exist_ok=True)
    with (output / "m_curve_check.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(f"{args.dataset}, split 0, validation = 20% of its training rows, {args.seeds} seeds\n")
    print("| M | real sweep: val NLL (mean ± std over seeds) | M curve: val NLL | difference | within spread |")
    print("|---|---|---|---|---|")
    for r in table:
        print(f"| {r['num_members']} | {r['sweep_val_nll_mean']:.3f} ± {r['sweep_val_nll_std']:.3f} | "
              f"{r['m_curve_val_nll_mean']:.3f} | {r['difference']:+.3f} | {'yes' if r['within_spread'] else 'no'} |")


if __name__ == "__main__":
    main()
