#!/usr/bin/env python
"""The paper's Table 1: RMSE and NLL on the UCI regression sets under the standard protocol.

    python -m benchmarks.benchmark_uci                                    # all data sets, all splits
    python -m benchmarks.benchmark_uci --datasets bostonHousing,yacht --splits 5 --tuned

Per split: standardise on the training rows, train M members (1 x 50 ReLU, 40 epochs, batch 100,
no adversarial training by default; beta-NLL 1, a cosine schedule and training.horizon_lr's rate
unless told otherwise), predict the test rows and score them in ORIGINAL units. The data sets are
those found in --data-dir plus `synthetic-hard`, a generated one (synthetic_hard_regime). The
table shows the Gaussian NLL of the moment-matched mixture (the paper's summary); the exact
mixture NLL is in the CSV files. `--tuned` adds a column whose learning rate and epoch count are
chosen per split on a validation part of that split's TRAINING rows only. `--hyper` adds a
hyper-deep ensemble column (Wenzel et al., 2020): per split, --hyper-samples configurations
drawn from HYPER_SPACE, each --hyper-seeds stacked members, train on 80% of the training rows;
greedy selection picks --hyper-size of those members by their mixture's NLL on the other 20%,
`combine` makes them one ensemble (not retrained on all rows), and a second column adds the
variance scale fitted on the same 20% (`calibrate`). `--hyper-refit` adds the chosen members
retrained on all the training rows, each from its own initialisation, with the variance scale and
the conformal scores fitted before the refit on the 20% (the only rows the members never saw).

The library's `EnsemblePool.fit_many` trains every split's ensemble (and the tuned column's
searches) on long-lived Ray actors, one per CPU: start-up is paid once per actor, not per split.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from benchmarks.common import REPO, fail, interval_columns, load_uci, score, write_csv

from ray_ensembles import DeepEnsemble, EnsemblePool, TensorDataset, combine, horizon_lr
from ray_ensembles.model.selection import greedy_selection

NAMES = {"bostonHousing": "Boston", "concrete": "Concrete", "energy": "Energy", "kin8nm": "Kin8nm",
         "naval-propulsion-plant": "Naval", "power-plant": "Power", "protein-tertiary-structure": "Protein",
         "wine-quality-red": "Wine (red)", "yacht": "Yacht", "synthetic-hard": "Synthetic (hard regime)"}
# Table 1 of the paper: (mean, +/-) for PBP, MC-dropout and Deep Ensembles
PAPER = {
    "Boston": {"rmse": [(3.01, .18), (2.97, .85), (3.28, 1.00)], "nll": [(2.57, .09), (2.46, .25), (2.41, .25)]},
    "Concrete": {"rmse": [(5.67, .09), (5.23, .53), (6.03, .58)], "nll": [(3.16, .02), (3.04, .09), (3.06, .18)]},
    "Energy": {"rmse": [(1.80, .05), (1.66, .19), (2.09, .29)], "nll": [(2.04, .02), (1.99, .09), (1.38, .22)]},
    "Kin8nm": {"rmse": [(0.10, .00), (0.10, .00), (0.09, .00)], "nll": [(-0.90, .01), (-0.95, .03), (-1.20, .02)]},
    "Naval": {"rmse": [(0.01, .00), (0.01, .00), (0.00, .00)], "nll": [(-3.73, .01), (-3.80, .05), (-5.63, .05)]},
    "Power": {"rmse": [(4.12, .03), (4.02, .18), (4.11, .17)], "nll": [(2.84, .01), (2.80, .05), (2.79, .04)]},
    "Protein": {"rmse": [(4.73, .01), (4.36, .04), (4.71, .06)], "nll": [(2.97, .00), (2.89, .01), (2.83, .02)]},
    "Wine (red)": {"rmse": [(0.64, .01), (0.62, .04), (0.64, .04)], "nll": [(0.97, .01), (0.93, .06), (0.94, .12)]},
    "Yacht": {"rmse": [(1.02, .05), (1.11, .38), (1.58, .48)], "nll": [(1.63, .02), (1.55, .12), (1.18, .21)]},
}
SYNTHETIC = "synthetic-hard"
SYNTHETIC_NOISE = 0.01
TUNED_LRS = (3e-3, 1e-2)
TUNED_MAX_EPOCHS, TUNED_EVAL_EVERY = 200, 20
# the hyper column's space: the example (#23)
HYPER_SPACE = {"lr": (1e-3, 3e-2), "weight_decay": (1e-6, 1e-3), "hidden_dim": (50, 100), "epochs": (40, 100, 200)}


def validation_carve(X, y, seed: int):
    """(fit rows, validation rows) of a split's TRAINING rows: 80% and 20%, by `seed`."""
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    val, fit_rows = order[:max(1, len(X) // 5)], order[max(1, len(X) // 5):]
    return (X[fit_rows], y[fit_rows]), (X[val], y[val])


def hyper_configs(count: int, seed: int) -> list[dict]:
    """`count` draws from HYPER_SPACE: log-uniform rate and weight decay, a width and a length."""
    rng = np.random.default_rng(seed)
    log_uniform = (lambda lo, hi: float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
    return [{"lr": log_uniform(*HYPER_SPACE["lr"]), "weight_decay": log_uniform(*HYPER_SPACE["weight_decay"]),
             "hidden_dim": int(rng.choice(HYPER_SPACE["hidden_dim"])), "epochs": int(rng.choice(HYPER_SPACE["epochs"]))}
            for _ in range(count)]


def hyper_jobs(key, X, y, cfg, seed) -> dict:
    """The hyper column's candidates for one split: each drawn configuration, `hyper_seeds`
    members stacked, trained on the fit rows (a seed of its own per configuration)."""
    (X_fit, y_fit), _ = validation_carve(X, y, seed)
    jobs = {}
    for c, draw in enumerate(hyper_configs(cfg["hyper_samples"], seed)):
        spec = job(X_fit, y_fit, dict(cfg, num_members=cfg["hyper_seeds"], hidden_dim=draw["hidden_dim"],
                                      lr=draw["lr"], epochs=draw["epochs"], seed=seed * 1000 + c))
        spec["weight_decay"] = draw["weight_decay"]
        jobs[(*key, "hyper", c)] = spec
    return jobs


def hyper_scores(candidates, draws, X, y, X_test, y_test, cfg, seed) -> tuple[dict, list, dict]:
    """Select and combine one split's candidates (FitResults, in draw order) on the validation
    rows; the test scores without and with the fitted variance scale, and the conformal
    intervals' (fitted on the same rows). Returns them, the picks (candidate, member) and the
    calibration fitted to the picks."""
    _, (X_val, y_val) = validation_carve(X, y, seed)
    ensembles = [c.ensemble for c in candidates]
    log_lik = torch.cat([e.evaluate_members(X_val, y_val)[0] for e in ensembles])
    members = [(t, i) for t, e in enumerate(ensembles) for i in range(e.num_members)]
    picks = [members[c] for c in greedy_selection(log_lik, cfg["hyper_size"])]
    hyper = combine([ensembles[t].subset([ensembles[t].member_ids[i]]) for t, i in picks], [draws[t] for t, _ in picks])
    out = {f"hyper_{k}": v for k, v in score(hyper, X_test, y_test).items()}
    out["hyper_widths"] = "/".join(str(c["hidden_dim"]) for c in hyper.member_configs)
    out["hyper_variance_scale"] = hyper.calibrate(X_val, y_val)["variance_scale"][0]
    out.update({f"hyper_cal_{k}": v for k, v in score(hyper, X_test, y_test).items()})
    hyper.conformalize(X_val, y_val)
    out.update(conformal_scores(hyper, X_test, y_test, "hyper_"))
    return out, picks, hyper.calibration


def conformal_scores(ensemble, X_test, y_test, prefix: str) -> dict:
    """Coverage and mean width of the ensemble's 90% conformal interval on the test rows."""
    return interval_columns(*ensemble.predict(X_test).conformal_interval(0.9), y_test, f"{prefix}conformal_", 0.9)


def refit_jobs(key, picks, draws, X, y, cfg, seed) -> dict:
    """The chosen members trained again on all of a split's training rows, each from its own
    initialisation (candidate t's seed, member i), with its draw's configuration."""
    jobs = {}
    for t, i in dict.fromkeys(picks):  # a member chosen twice trains once
        draw = draws[t]
        spec = job(X, y, dict(cfg, num_members=1, member_ids=[i], hidden_dim=draw["hidden_dim"], lr=draw["lr"],
                              epochs=draw["epochs"], seed=seed * 1000 + t))
        spec["weight_decay"] = draw["weight_decay"]
        jobs[(*key, "refit", t, i)] = spec
    return jobs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "uci"))
    p.add_argument("--datasets", default=None, help="comma list (default: every data set found)")
    p.add_argument("--splits", type=int, default=None, help="first N splits (default: all)")
    p.add_argument("--num-members", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--hidden-dim", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=None,
                   help="default: 0.1 up to 200 steps, then 0.1 * sqrt(200 / steps) (training.horizon_lr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adversarial-eps", type=float, default=0.0)
    p.add_argument("--nll-beta", type=float, default=1.0, help="0 is the paper's plain NLL")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine", help="the paper's is constant")
    p.add_argument("--tuned", action="store_true", help="also the per-split tuned column")
    p.add_argument("--hyper", action="store_true", help="also the hyper-deep ensemble columns")
    p.add_argument("--hyper-samples", type=int, default=30, help="configurations drawn per split")
    p.add_argument("--hyper-seeds", type=int, default=2, help="members per configuration")
    p.add_argument("--hyper-size", type=int, default=5, help="members selected")
    p.add_argument("--hyper-refit", action="store_true", help="also the chosen members retrained on all training rows")
    p.add_argument("--num-workers", type=int, default=None, help="Ray workers (default: the cluster's CPUs)")
    p.add_argument("--output", default="outputs/benchmark_uci")
    return p.parse_args(argv)


def synthetic_hard_regime(rows: int = 20_000, max_splits: int | None = None, seed: int = 0):
    """load_uci's tuple for data shaped like the hard UCI regime of a physical plant (as Naval):
    12 sensors (std 0.04 to 1,000, on offsets up to 1e4) are set by an operating lever (9
    levels), and two slow states (the target's causes) change every sensor by about 1%; plus an
    exactly constant column, one constant up to rounding, one that varies by 1e-6 of its mean
    and a rare binary flag. The target is a smooth function of the two states, with noise of
    SYNTHETIC_NOISE times its std (also returned). Splits: 5 random 90% / 10%."""
    g = np.random.default_rng(seed)
    lever, states = g.integers(0, 9, rows) / 8, g.random((rows, 2))
    sensors = np.exp(np.outer(lever, g.uniform(0.5, 2.5, 12))) * 10.0 ** g.integers(-2, 4, 12) + 10.0 ** g.integers(0, 5, 12)
    sensors *= (1 + 0.01 * states @ g.normal(size=(2, 12))) * (1 + 1e-5 * g.normal(size=(rows, 12)))
    near_constant = np.column_stack([np.full(rows, 288.0), 0.998 + 1e-12 * g.normal(size=rows),
                                     1.0 + 1e-6 * states[:, 0], g.random(rows) < 0.002])
    clean = states[:, 1] + 0.3 * np.sin(3 * states[:, 0])
    noise = SYNTHETIC_NOISE * clean.std()
    data = np.column_stack([sensors, near_constant, clean + noise * g.normal(size=rows)])
    n_splits = min(5, max_splits or 5)
    orders = [np.random.default_rng([seed, k]).permutation(rows) for k in range(n_splits)]
    splits = [(order[rows // 10:], order[:rows // 10]) for order in orders]
    return (data, list(range(16)), 16, splits), noise


def trainer_options(cfg, num_rows: int) -> dict:
    """The Trainer's options for a run of cfg["epochs"] on `num_rows` rows."""
    steps = cfg["epochs"] * math.ceil(num_rows / cfg["batch_size"])
    return {"train_batch_size": cfg["batch_size"], "train_num_epochs": cfg["epochs"],
            "train_lr": cfg["lr"] or horizon_lr(steps), "lr_scheduler": cfg["lr_schedule"] == "cosine",
            **({"weight_decay": cfg["weight_decay"]} if cfg.get("weight_decay") else {})}


def job(X, y, cfg, validation=None) -> dict:
    """Trainer arguments for M members on these rows (the Trainer standardises on them only)."""
    ensemble = DeepEnsemble(X.shape[1], 1, num_members=cfg["num_members"], hidden_dim=cfg["hidden_dim"],
                            depth=1, use_adversarial_training=cfg["adversarial_eps"] > 0,
                            adversarial_eps=cfg["adversarial_eps"] or 0.01, seed=cfg["seed"],
                            nll_beta=cfg["nll_beta"], member_ids=cfg.get("member_ids"))
    return {"ensemble": ensemble, "dataset": TensorDataset(X, y), "validation_dataset": validation,
            **trainer_options(cfg, len(X))}


def split_arrays(arrays):
    """(X train, y train, X test, y test) of one split, as float64 tensors."""
    data, features, target, (train, test) = arrays
    X, y = torch.from_numpy(data[:, features]), torch.from_numpy(data[:, [target]])
    return X[train], y[train], X[test], y[test]


def search_jobs(key, X, y, cfg, seed) -> dict:
    """The tuned column's search: per rate, TUNED_MAX_EPOCHS epochs on 80% of the training rows,
    scored on the other 20% every TUNED_EVAL_EVERY epochs (the Trainer's validation metrics)."""
    (X_fit, y_fit), (X_val, y_val) = validation_carve(X, y, seed)
    validation = TensorDataset(X_val, y_val)
    jobs = {}
    for lr in TUNED_LRS:
        spec = job(X_fit, y_fit, dict(cfg, lr=lr, epochs=TUNED_MAX_EPOCHS), validation)
        spec["save_every"] = TUNED_EVAL_EVERY * math.ceil(len(X_fit) / cfg["batch_size"])
        jobs[(*key, lr)] = spec
    return jobs


def chosen(searches) -> dict:
    """The rate and epoch count of the lowest validation NLL (the exact mixture's) among the
    searches' reports, [(lr, FitResult)]."""
    nll, lr, epoch = min((entry["val_nll"], lr, entry["epoch"]) for lr, result in searches
                         for entry in result.history if "val_nll" in entry)
    return {"lr": lr, "epochs": epoch + 1}


def run_splits(splits: dict, cfg, fit, extra_scores=None) -> list[dict]:
    """Every split, end to end: `splits` {(dataset, k): load_uci arrays}; `fit(jobs)` trains
    {key: Trainer arguments} and returns {key: FitResult} (fit_many on a pool, in the benchmark).
    `extra_scores(key, ensemble, X_test, y_test)` adds columns of its own to each split's row."""
    data = {key: split_arrays(arrays) for key, arrays in splits.items()}
    jobs = {key: job(X, y, cfg) for key, (X, y, _, _) in data.items()}
    if cfg["tuned"]:
        for key, (X, y, _, _) in data.items():
            jobs.update(search_jobs(key, X, y, cfg, seed=cfg["seed"] + key[1]))
    if cfg["hyper"]:
        for key, (X, y, _, _) in data.items():
            jobs.update(hyper_jobs(key, X, y, cfg, seed=cfg["seed"] + key[1]))
    results = fit(dict(sorted(jobs.items(), key=lambda kv: -len(kv[1]["dataset"]))))  # large first: no idle end
    rows = {}
    for key, (X, y, X_test, y_test) in data.items():
        rows[key] = {"dataset": key[0], "split": key[1], "lr": jobs[key]["train_lr"],
                     **score(results[key].ensemble, X_test, y_test), "worker_s": results[key].worker_s,
                     **(extra_scores(key, results[key].ensemble, X_test, y_test) if extra_scores else {})}
    if cfg["hyper"]:
        refits, chosen_members = {}, {}
        for key, (X, y, X_test, y_test) in data.items():
            seed = cfg["seed"] + key[1]
            draws = hyper_configs(cfg["hyper_samples"], seed)
            candidates = [results[(*key, "hyper", c)] for c in range(cfg["hyper_samples"])]
            scores, picks, calibration = hyper_scores(candidates, draws, X, y, X_test, y_test, cfg, seed)
            rows[key].update(scores)
            rows[key]["worker_s"] += sum(r.worker_s for r in candidates)
            if cfg.get("hyper_refit"):
                refits.update(refit_jobs(key, picks, draws, X, y, cfg, seed))
                chosen_members[key] = (picks, [draws[t] for t, _ in picks], calibration)
        refitted = fit(refits) if refits else {}
        for key, (picks, configs, calibration) in chosen_members.items():
            X_test, y_test = data[key][2:]
            parts = [refitted[(*key, "refit", t, i)] for t, i in picks]
            hyper = combine([p.ensemble for p in parts], configs)
            rows[key].update({f"hyper_refit_{k}": v for k, v in score(hyper, X_test, y_test).items()})
            # the variance scale and conformal scores of the members before the refit: the only
            # rows they never trained on were the validation rows, which the refit trains on
            hyper.calibration = calibration
            rows[key].update({f"hyper_refit_cal_{k}": v for k, v in score(hyper, X_test, y_test).items()})
            rows[key].update(conformal_scores(hyper, X_test, y_test, "hyper_refit_"))
            rows[key]["worker_s"] += sum(p.worker_s for p in dict(zip(picks, parts)).values())
    if cfg["tuned"]:
        finals = {}
        for key, (X, y, _, _) in data.items():
            searches = [(lr, results[(*key, lr)]) for lr in TUNED_LRS]
            pick = chosen(searches)
            rows[key].update(tuned_lr=pick["lr"], tuned_epochs=pick["epochs"])
            rows[key]["worker_s"] += sum(r.worker_s for _, r in searches)
            finals[key] = job(X, y, dict(cfg, **pick))
        for key, result in fit(finals).items():
            X_test, y_test = data[key][2:]
            rows[key].update({f"tuned_{k}": v for k, v in score(result.ensemble, X_test, y_test).items()})
            rows[key]["worker_s"] += result.worker_s
    return list(rows.values())


def summarize(rows, prefix=""):
    out = {}
    for metric in ("rmse", "nll", "nll_mixture"):
        values = [r[prefix + metric] for r in rows]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out.update({f"{prefix}{metric}_mean": statistics.fmean(values), f"{prefix}{metric}_std": std,
                    f"{prefix}{metric}_stderr": std / math.sqrt(len(values))})
    return out


def markdown(summary_rows, tuned: bool, hyper: bool = False, refit: bool = False) -> str:
    head = ["Dataset", "splits", "RMSE ours", "NLL ours"] + (["RMSE tuned", "NLL tuned"] if tuned else []) + \
        (["RMSE hyper", "NLL hyper", "NLL hyper + scale"] if hyper else []) + \
        (["NLL hyper refit", "NLL hyper refit + scale", "conformal 90% coverage"] if refit else []) + \
        ["RMSE DE", "NLL DE", "NLL MC-dropout", "NLL PBP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary_rows:
        paper = PAPER.get(NAMES.get(s["dataset"], s["dataset"]))
        pm = (lambda m, v: f"{m:.2f} ± {v:.2f}")
        cells = [NAMES.get(s["dataset"], s["dataset"]), str(s["n_splits"]),
                 pm(s["rmse_mean"], s["rmse_stderr"]), pm(s["nll_mean"], s["nll_stderr"])]
        if tuned:
            cells += [pm(s["tuned_rmse_mean"], s["tuned_rmse_stderr"]), pm(s["tuned_nll_mean"], s["tuned_nll_stderr"])]
        if hyper:
            cells += [pm(s["hyper_rmse_mean"], s["hyper_rmse_stderr"]), pm(s["hyper_nll_mean"], s["hyper_nll_stderr"]),
                      pm(s["hyper_cal_nll_mean"], s["hyper_cal_nll_stderr"])]
        if refit:
            cells += [pm(s["hyper_refit_nll_mean"], s["hyper_refit_nll_stderr"]),
                      pm(s["hyper_refit_cal_nll_mean"], s["hyper_refit_cal_nll_stderr"]),
                      f"{s['hyper_refit_conformal_coverage_90_mean']:.2f}"]
        cells += [pm(*paper["rmse"][2]), pm(*paper["nll"][2]), pm(*paper["nll"][1]), pm(*paper["nll"][0])] \
            if paper else ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    args.hyper = args.hyper or args.hyper_refit
    try:
        root = Path(args.data_dir)
        names = args.datasets.split(",") if args.datasets else None
        if not root.is_dir() and names != [SYNTHETIC]:
            raise ValueError(f"The '--data-dir' option must be a folder in the UCI_Datasets layout (or pass "
                             f"--datasets {SYNTHETIC}). Got {str(root)!r} instead.")
        found = sorted(p.name for p in root.iterdir() if (p / "data.txt").exists()) if root.is_dir() else []
        found.append(SYNTHETIC)
        names = names or found
        unknown = [n for n in names if n not in found]
        if unknown:
            raise ValueError(f"The '--datasets' option names data sets not in {root} ({found}). Got {unknown} instead.")
        for option in ("num_members", "epochs", "hidden_dim", "batch_size", "hyper_samples", "hyper_seeds", "hyper_size"):
            if getattr(args, option) < 1:
                raise ValueError(f"The '--{option.replace('_', '-')}' option must be >= 1. Got {getattr(args, option)} instead.")
        if args.splits is not None and args.splits < 1:
            raise ValueError(f"The '--splits' option must be >= 1. Got {args.splits} instead.")
        if (args.lr is not None and args.lr <= 0) or args.adversarial_eps < 0:
            raise ValueError(f"The '--lr' option must be > 0 and '--adversarial-eps' >= 0. Got {args.lr}, {args.adversarial_eps} instead.")
        if not 0 <= args.nll_beta <= 1:
            raise ValueError(f"The '--nll-beta' option must be in [0, 1]. Got {args.nll_beta} instead.")
    except ValueError as err:
        fail(str(err))
    cfg = {"num_members": args.num_members, "hidden_dim": args.hidden_dim, "epochs": args.epochs,
           "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
           "adversarial_eps": args.adversarial_eps, "tuned": args.tuned, "nll_beta": args.nll_beta,
           "lr_schedule": args.lr_schedule, "hyper": args.hyper, "hyper_samples": args.hyper_samples,
           "hyper_seeds": args.hyper_seeds, "hyper_size": args.hyper_size, "hyper_refit": args.hyper_refit}

    import ray
    wall_start = time.perf_counter()
    if not ray.is_initialized():  # a new local Ray gets --num-workers CPUs; one at RAY_ADDRESS is joined as it is
        ray.init(**({"num_cpus": args.num_workers} if args.num_workers and not os.environ.get("RAY_ADDRESS") else {}))
    ray_start_s = time.perf_counter() - wall_start
    splits, noise = {}, {}
    for name in names:
        if name == SYNTHETIC:
            (data, features, target, found_splits), noise[name] = synthetic_hard_regime(max_splits=args.splits)
        else:
            data, features, target, found_splits = load_uci(root / name, args.splits)
        splits.update({(name, k): (data, features, target, split) for k, split in enumerate(found_splits)})
    with EnsemblePool(args.num_workers) as pool:
        workers = pool.num_workers
        rows = run_splits(splits, cfg, lambda jobs: pool.fit_many(jobs, progress=True))
    wall = time.perf_counter() - wall_start

    summary_rows = []
    for name in names:
        mine = sorted((r for r in rows if r["dataset"] == name), key=lambda r: r["split"])
        summary = {"dataset": name, "n_splits": len(mine), **summarize(mine)}
        if args.tuned:
            summary.update(summarize(mine, "tuned_"))
        if args.hyper:
            summary.update(summarize(mine, "hyper_"))
            summary.update(summarize(mine, "hyper_cal_"))
            if args.hyper_refit:
                summary.update(summarize(mine, "hyper_refit_"))
                summary.update(summarize(mine, "hyper_refit_cal_"))
            for prefix in ("hyper_", "hyper_refit_")[:1 + args.hyper_refit]:
                summary[f"{prefix}conformal_coverage_90_mean"] = statistics.fmean(r[f"{prefix}conformal_coverage_90"] for r in mine)
        summary["noise_std"] = noise.get(name, "")  # known only for the synthetic set
        summary["worker_s"] = sum(r["worker_s"] for r in mine)
        summary_rows.append(summary)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    write_csv(summary_rows, output / "uci.csv")
    write_csv(sorted(rows, key=lambda r: (r["dataset"], r["split"])), output / "uci_splits.csv")
    table = markdown(summary_rows, args.tuned, args.hyper, args.hyper_refit)
    (output / "uci.md").write_text(table + "\n")
    busy = sum(r["worker_s"] for r in rows)
    outside = 1 - busy / (wall * workers)
    print(table)
    for s in summary_rows:
        if s["noise_std"] != "":
            print(f"\n{s['dataset']}: RMSE {s['rmse_mean'] / s['noise_std']:.2f} x the noise std; moment-matched "
                  f"minus exact-mixture NLL {s['nll_mean'] - s['nll_mixture_mean']:+.3f} nats")
    print(f"\nOurs: mean ± standard error over splits; NLL of the moment-matched Gaussian, in original units. "
          f"Paper: mean ± as printed.\nwall time {wall:.1f} s on {workers} workers (Ray start {ray_start_s:.1f} s); "
          f"{100 * outside:.0f}% of worker time outside the ensembles' fits")
    (output / "timing.txt").write_text(f"wall_s {wall:.1f}\nworkers {workers}\nray_start_s {ray_start_s:.1f}\n"
                                       f"fraction_outside_training {outside:.3f}\n")


if __name__ == "__main__":
    main()
