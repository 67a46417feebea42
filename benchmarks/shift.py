#!/usr/bin/env python
"""Uncertainty out of the data: UCI sets split by extrapolation and gaps, and the toy beyond [-4, 4].

    python -m benchmarks.shift                                # every UCI set, both settings
    python -m benchmarks.shift --datasets bostonHousing,yacht --standard-splits 5

Shifted splits (`shifted_splits`): the inputs standardised, each row projected on the first and
second principal components; the test rows are the 10% with the highest projection ("pc1_high",
"pc2_high"), the lowest ("pc1_low", "pc2_low"), or the middle 10% of the first component ("pc1_gap",
a slab the training rows surround). No randomness: the same data give the same splits. Beside
them, the first --standard-splits standard splits. Every split is scored in original units: the
moment-matched Gaussian's NLL, RMSE, and the coverage and mean width of its central 90% and 95%
intervals. Settings (SETTINGS): the library's default (beta-NLL 1, cosine schedule,
training.horizon_lr), the paper's plain NLL (beta 0) with the same schedule and rate, and the
default trained on 80% of the training rows with split-conformal intervals fitted on the other
20% (`conformal_carve`), scored alike.

The toy (the train job's default problem, 20 points of y = x^3 + N(0, 3^2) on [-4, 4], 5
members of 1 x 100): for each of TOY_SETTINGS, the z-score (truth - mean) / sd at x = -6, -5, 5,
6, the share of [-6, 6] where the truth is inside mean +/- 3 sd, and the in-distribution NLL on
1000 fresh points. Writes benchmarks/results/shift.csv, shift_toy.csv and prints both tables.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO, RESULTS, fail, interval_columns, load_uci, write_csv

SHIFT_FRACTION = 0.1
SETTINGS = {"default (beta-NLL 1)": {"nll_beta": 1.0}, "plain NLL": {"nll_beta": 0.0},
            "default + conformal": {"nll_beta": 1.0, "conformal": True},  # members on 80%, scores on 20%
            # candidates for the defaults (--settings)
            "beta-NLL 0.5": {"nll_beta": 0.5}, "beta-NLL 0.25": {"nll_beta": 0.25},
            "default + FGSM 0.01": {"nll_beta": 1.0, "adversarial_eps": 0.01},
            "default for 20 epochs": {"nll_beta": 1.0, "epochs": 20},
            "default + weight decay 1e-3": {"nll_beta": 1.0, "weight_decay": 1e-3}}
RUN_BY_DEFAULT = list(SETTINGS)[:3]
# the toy: (loss weighting beta, schedule, rate, epochs); the first is the train job's default
TOY_SETTINGS = [(1.0, "cosine", 0.01, 200), (1.0, "cosine", 0.1, 200), (1.0, "cosine", 0.1, 40),
                (0.0, "cosine", 0.1, 40), (0.0, "constant", 0.1, 40), (0.0, "cosine", 0.01, 200),
                (0.5, "cosine", 0.01, 200)]


def shifted_splits(X: np.ndarray, fraction: float = SHIFT_FRACTION) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (train rows, test rows)} of the inputs X (N, D): the `fraction` of rows at the
    high and low end of the first two principal components, and the middle slab of the first.
    Deterministic (each component's sign fixed by its largest loading, ties by row order)."""
    std = X.std(0)
    Z = (X - X.mean(0)) / np.where(std > 0, std, 1.0)
    _, _, components = np.linalg.svd(Z, full_matrices=False)
    n, n_test = len(X), max(1, round(fraction * len(X)))
    splits = {}
    for k in range(min(2, components.shape[0])):
        component = components[k] * np.sign(components[k][np.argmax(np.abs(components[k]))])
        order = np.argsort(Z @ component, kind="stable")
        tests = {f"pc{k + 1}_high": order[n - n_test:], f"pc{k + 1}_low": order[:n_test]}
        if k == 0:
            start = (n - n_test) // 2
            tests["pc1_gap"] = order[start:start + n_test]
        for name, test in tests.items():
            splits[name] = (np.setdiff1d(np.arange(n), test), np.sort(test))
    return splits


def conformal_carve(splits: dict, seed: int = 0) -> tuple[dict, dict]:
    """Each split with its training rows cut 80/20 by a permutation seeded by (seed, split): the
    splits whose members train on the 80%, and per split the 20% (X, y) the conformal scores are
    fitted on."""
    from benchmarks.benchmark_uci import split_arrays

    fitted, held = {}, {}
    for key, (data, features, target, (train, test)) in splits.items():
        order = np.random.default_rng(seed + key[1]).permutation(train)
        n_held = max(1, len(train) // 5)
        fitted[key] = (data, features, target, (np.sort(order[n_held:]), test))
        held[key] = split_arrays((data, features, target, (np.sort(order[:n_held]), test)))[:2]
    return fitted, held


def interval_scores(ensemble, X, y, held_out=None) -> dict:
    """Coverage and mean width of the central 90% and 95% intervals of the moment-matched
    Gaussian, and with `held_out` rows (X, y) those of the conformal intervals fitted on them."""
    if held_out is not None:
        ensemble.conformalize(*held_out)
    pred, out = ensemble(X), {}
    for level in (0.9, 0.95):
        out.update(interval_columns(*pred.interval(level), y, "", level))
        if held_out is not None:
            out.update(interval_columns(*pred.conformal_interval(level), y, "conformal_", level))
    return out


def toy_row(beta: float, schedule: str, lr: float, epochs: int, seed: int = 0) -> dict:
    from ray_ensembles import DeepEnsemble, Trainer
    from ray_ensembles.loop.data import cubic_toy
    from ray_ensembles.model.metrics import gaussian_nll

    train, test = cubic_toy(20, seed), cubic_toy(1000, seed + 1)
    ensemble = DeepEnsemble(1, num_members=5, hidden_dim=100, seed=seed, nll_beta=beta)
    with tempfile.TemporaryDirectory() as folder:
        Trainer(ensemble, train, train_batch_size=20, train_lr=lr, train_num_epochs=epochs,
                lr_scheduler=schedule == "cosine", results_folder=folder, save_every=10 ** 9).train()
    at = torch.tensor([[-6.0], [-5.0], [5.0], [6.0]])
    pred = ensemble(at)
    z = ((at ** 3 - pred.mean) / pred.stddev)[:, 0].tolist()
    grid = torch.linspace(-6, 6, 241).unsqueeze(1)
    g = ensemble(grid)
    held = ((grid ** 3 - g.mean).abs() <= 3 * g.stddev).double().mean().item()
    p, fit = ensemble(test.X), ensemble(train.X)
    return {"nll_beta": beta, "schedule": schedule, "lr": lr, "epochs": epochs,
            **{f"sd_at_{x:g}": s for x, s in zip([-6, -5, 5, 6], pred.stddev[:, 0].tolist())},
            **{f"z_at_{x:g}": v for x, v in zip([-6, -5, 5, 6], z)},
            # the mechanism: which part of the sd is left beyond the data, against the fit inside it
            **{f"aleatoric_sd_at_{x:g}": s for x, s in zip([-6, -5, 5, 6], pred.aleatoric.sqrt()[:, 0].tolist())},
            **{f"epistemic_sd_at_{x:g}": s for x, s in zip([-6, -5, 5, 6], pred.epistemic.sqrt()[:, 0].tolist())},
            "train_rmse": (fit.mean - train.y).square().mean().sqrt().item(),
            "train_aleatoric_sd": fit.aleatoric.sqrt().mean().item(),
            "share_of_[-6,6]_within_3sd": held, "test_nll_in_distribution": gaussian_nll(p.mean, p.variance, test.y)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "uci"))
    p.add_argument("--datasets", default=None, help="comma list (default: every data set found)")
    p.add_argument("--standard-splits", type=int, default=5, help="the first N standard splits beside the shifted ones")
    p.add_argument("--num-workers", type=int, default=None, help="Ray actors (default: the cluster's CPUs)")
    p.add_argument("--no-toy", action="store_true")
    p.add_argument("--settings", default=",".join(RUN_BY_DEFAULT), help=f"a comma list of {list(SETTINGS)}")
    p.add_argument("--output", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from benchmarks.benchmark_uci import NAMES, run_splits

    try:
        root = Path(args.data_dir)
        if not root.is_dir():
            raise ValueError(f"The '--data-dir' option must be a folder in the UCI_Datasets layout. Got {str(root)!r} instead.")
        found = sorted(p.name for p in root.iterdir() if (p / "data.txt").exists())
        names = args.datasets.split(",") if args.datasets else found
        unknown = [n for n in names if n not in found]
        if unknown:
            raise ValueError(f"The '--datasets' option names data sets not in {root} ({found}). Got {unknown} instead.")
        settings = args.settings.split(",")
        if not set(settings) <= set(SETTINGS):
            raise ValueError(f"The '--settings' option must name settings of {list(SETTINGS)}. Got {settings} instead.")
        if args.standard_splits < 0:
            raise ValueError(f"The '--standard-splits' option must be >= 0. Got {args.standard_splits} instead.")
    except ValueError as err:
        fail(str(err))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    import ray

    from ray_ensembles import EnsemblePool

    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    splits, kinds = {}, {}
    for name in names:
        data, features, target, standard = load_uci(root / name, args.standard_splits or None)
        for k, split in enumerate(standard[:args.standard_splits]):
            splits[(name, k)] = (data, features, target, split)
            kinds[(name, k)] = "standard"
        for j, (kind, split) in enumerate(shifted_splits(data[:, features]).items()):
            splits[(name, 1000 + j)] = (data, features, target, split)
            kinds[(name, 1000 + j)] = kind
    base = {"num_members": 5, "hidden_dim": 50, "epochs": 40, "batch_size": 100, "lr": None, "seed": 0,
            "adversarial_eps": 0.0, "tuned": False, "hyper": False, "lr_schedule": "cosine"}
    rows = []
    workers = args.num_workers or int(ray.cluster_resources().get("CPU", 1))
    with EnsemblePool(workers) as pool:
        for setting in settings:
            options = SETTINGS[setting]
            runs, held = conformal_carve(splits) if options.get("conformal") else (splits, {})
            scored = run_splits(runs, dict(base, **options), pool.fit_many,
                                extra_scores=lambda key, e, X, y: interval_scores(e, X, y, held.get(key)))
            for row in scored:
                key = (row["dataset"], row["split"])
                rows.append({"setting": setting, "kind": kinds[key], **row})
    write_csv(rows, output / "shift.csv")
    print(shift_table(rows, NAMES, settings))
    if not args.no_toy:
        toy = [toy_row(*s) for s in TOY_SETTINGS]
        write_csv(toy, output / "shift_toy.csv")
        print(toy_table(toy))
    print(f"\n{time.perf_counter() - started:.0f} s in all")


def shift_table(rows, names, settings) -> str:
    """Per data set and setting: the standard splits' and the shifted splits' means."""
    head = ["Dataset", "setting", "NLL std", "NLL shifted", "RMSE std", "RMSE shifted",
            "cover 90 std", "cover 90 shifted", "cover 95 shifted", "width 90 std", "width 90 shifted",
            "conformal cover 90 std", "conformal cover 90 shifted", "conformal width 90 std", "conformal width 90 shifted"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for setting in settings:
            def mean(metric, shifted):
                values = [r[metric] for r in rows if r["dataset"] == dataset and r["setting"] == setting
                          and (r["kind"] != "standard") == shifted and metric in r]
                return statistics.fmean(values) if values else math.nan
            lines.append("| " + " | ".join([names.get(dataset, dataset), setting] + [
                f"{mean(m, s):.2f}" for m, s in [("nll", False), ("nll", True), ("rmse", False), ("rmse", True),
                                                 ("coverage_90", False), ("coverage_90", True), ("coverage_95", True),
                                                 ("width_90", False), ("width_90", True),
                                                 ("conformal_coverage_90", False), ("conformal_coverage_90", True),
                                                 ("conformal_width_90", False), ("conformal_width_90", True)]]
            ).replace("nan", "-") + " |")
    return "\n".join(lines)


def toy_table(toy) -> str:
    head = ["beta, schedule, rate, epochs", "sd at -6, -5, 5, 6", "z at -6, -5, 5, 6", "[-6, 6] within 3 sd", "NLL in",
            "aleatoric sd at -6, 6", "epistemic sd at -6, 6", "train RMSE", "train aleatoric sd (truth 3)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in toy:
        lines.append(f"| {r['nll_beta']:g}, {r['schedule']}, {r['lr']:g}, {r['epochs']} | "
                     + ", ".join(f"{r[f'sd_at_{x}']:.1f}" for x in (-6, -5, 5, 6)) + " | "
                     + ", ".join(f"{r[f'z_at_{x}']:.1f}" for x in (-6, -5, 5, 6))
                     + f" | {100 * r['share_of_[-6,6]_within_3sd']:.0f}% | {r['test_nll_in_distribution']:.2f} | "
                     + ", ".join(f"{r[f'aleatoric_sd_at_{x}']:.1f}" for x in (-6, 6)) + " | "
                     + ", ".join(f"{r[f'epistemic_sd_at_{x}']:.1f}" for x in (-6, 6))
                     + f" | {r['train_rmse']:.2f} | {r['train_aleatoric_sd']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
