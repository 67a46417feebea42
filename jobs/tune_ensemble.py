#!/usr/bin/env python
"""Sweep ensemble size M and adversarial epsilon with Ray Tune, scored by validation NLL.

    python jobs/tune_ensemble.py                                  # the toy problem
    python jobs/tune_ensemble.py --data t.parquet --target y --num-members 1,3,5,10 \
        --adversarial-eps 0,0.01,0.02 --scheduler asha --output out/
    python jobs/tune_ensemble.py --m-curve --num-members 10       # the M curve from ONE ensemble per eps

Writes OUTPUT/trials.csv (or m_curve.csv), OUTPUT/val_nll_vs_m.png and the best ensemble in
OUTPUT/best_ensemble. Validation rows come from the training data, never the test rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

from common import TOY, add_console_arguments, add_data_arguments, default_lr, fail, load_data, num_classes, say, start_ray

from ray_ensembles.io.locations import check_store


def number_list(kind):
    def parse(text):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}s, got {text!r}")
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(p)
    p.add_argument("--num-members", type=number_list(int), default=[1, 3, 5, 10])
    p.add_argument("--adversarial-eps", type=number_list(float), default=[0.0, 0.01, 0.02])
    p.add_argument("--lr", type=number_list(float), default=None, help="learning rates to sweep too")
    p.add_argument("--epochs", type=int, default=None, help="default 40")
    p.add_argument("--batch-size", type=int, default=None, help="default 20 on the toy, else 100")
    p.add_argument("--hidden-dim", type=int, default=None, help="default 100 on the toy, else 50")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=["asha", "none"], default="none")
    p.add_argument("--num-reports", type=int, default=4, help="validation reports per trial (ASHA's rungs)")
    p.add_argument("--max-concurrent", type=int, default=None, help="default: as many as the cluster fits")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--trial-training", choices=["auto", "in_trial", "ray_train"], default="auto",
                   help="where a trial trains: in its own process, or a Ray Train run (auto: in_trial "
                        "unless --use-gpu or --max-workers-per-trial > 1)")
    p.add_argument("--max-workers-per-trial", type=int, default=None,
                   help="Ray Train workers per trial (default: up to M)")
    p.add_argument("--storage-path", default=None, help="default: OUTPUT/runs")
    p.add_argument("--name", default=None, help="sweep name (default: unique)")
    p.add_argument("--resume", action="store_true", help="continue the sweep called --name")
    p.add_argument("--m-curve", action="store_true",
                   help="train ONE ensemble of max(--num-members) per eps and score member subsets")
    p.add_argument("--output", default="outputs/tune_ensemble")
    p.add_argument("--smoke-test", action="store_true")
    add_console_arguments(p)
    return p.parse_args(argv)


def resolve(args):
    from ray_ensembles.sweep import normalize_param_space

    toy = args.data is None
    if args.smoke_test:
        args.num_members, args.adversarial_eps = [1, 2], args.adversarial_eps[:1]
        args.epochs, args.num_reports = 3, 2
    for key, toy_value, table_value in [("epochs", TOY["epochs"], 40), ("batch_size", 20, 100), ("hidden_dim", 100, 50)]:
        if getattr(args, key) is None:
            setattr(args, key, toy_value if toy else table_value)
    if args.lr is None and toy:
        args.lr = [TOY["lr"]]
    space = {"num_members": args.num_members, "adversarial_eps": args.adversarial_eps}
    if args.lr is not None and len(args.lr) > 1:
        space["train_lr"] = args.lr
    normalize_param_space(space)  # empty grids, M < 1, eps < 0: before Ray starts
    return space


def toy_recipe(args) -> tuple[dict, dict]:
    """The toy's loss (ensemble options) and schedule (Trainer options), the train job's; a table
    keeps the library's."""
    if args.data is not None:
        return {}, {}
    return {"nll_beta": TOY["nll_beta"]}, {"lr_scheduler": TOY["lr_schedule"] == "cosine"}


def write_csv(rows, path: Path, first):
    columns = first + [c for c in dict.fromkeys(k for r in rows for k in r) if c not in first]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows, columns):
    print(" ".join(f"{c:>16}" for c in columns))
    for r in rows:
        print(" ".join(f"{r.get(c) if not isinstance(r.get(c), float) else round(r[c], 4)!s:>16}" for c in columns))


def plot(series: dict, path: Path, errors: dict | None = None):
    """val NLL against M, one line per epsilon."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for eps, points in sorted(series.items()):
        ms, nll = zip(*sorted(points))
        ax.errorbar(ms, nll, yerr=None if errors is None else [e for _, e in sorted(errors[eps])],
                    marker="o", capsize=3, label=f"eps = {eps:g}")
    ax.set(xlabel="ensemble size M", ylabel="validation NLL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sweep(args, space, train, validation, output: Path):
    from ray_ensembles.io import storage
    from ray_ensembles.sweep import tune_ensemble

    loss, schedule = toy_recipe(args)
    result = tune_ensemble(
        train, space, task=args.task, validation_dataset=validation,
        ensemble_options={"hidden_dim": args.hidden_dim, "depth": args.depth, "seed": args.seed, **loss},
        trainer_options={"train_lr": args.lr[0], "train_num_epochs": args.epochs,
                         "train_batch_size": args.batch_size, **schedule},
        scheduler=None if args.scheduler == "none" else args.scheduler, num_reports=args.num_reports,
        max_concurrent=args.max_concurrent, cpus_per_worker=args.cpus_per_worker, use_gpu=args.use_gpu,
        trial_training=args.trial_training, max_workers_per_trial=args.max_workers_per_trial,
        storage_path=args.storage_path or str((output / "runs").resolve()), name=args.name,
        resume=args.resume, seed=args.seed, progress=not (args.quiet or args.json),
        callbacks=tracking_callbacks(args))
    output.mkdir(parents=True, exist_ok=True)
    first = ["num_members", "adversarial_eps", "val_nll"]
    write_csv(result.table, output / "trials.csv", first)
    if args.json:
        print(json.dumps({"trials": result.table, "best_config": result.best_config,
                          "best_ensemble": str(output / "best_ensemble")}, default=str))
    else:
        print_table(result.table, first + [c for c in ("train_lr", "val_rmse", "val_accuracy", "training_iteration",
                                                        "training") if c in result.table[0]])
    series = {}
    for r in result.table:
        if r.get("val_nll") is not None:
            series.setdefault(r["adversarial_eps"], []).append((r["num_members"], r["val_nll"]))
    plot(series, output / "val_nll_vs_m.png")
    with storage.local_copy(result.best_ensemble_path) as best:
        shutil.copytree(best, output / "best_ensemble", dirs_exist_ok=True)
    say(args, f"best: {result.best_config} -> {output / 'best_ensemble'}")


def tracking_callbacks(args) -> list:
    """Ray Tune's own MLflow logger: one MLflow run per trial, with its config and reports.
    (Tune's TensorBoard event files are in each trial's folder under --storage-path already.)"""
    if not args.mlflow_tracking_uri:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray_ensembles.io.tracking import file_store_uri

    return [MLflowLoggerCallback(tracking_uri=file_store_uri(args.mlflow_tracking_uri),
                                 experiment_name=args.mlflow_experiment, save_artifact=False)]


def run_m_curve(args, train, validation, output: Path):
    """One ensemble of max(M) members per eps, through the same Ray Trainer path."""
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig

    from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier, Trainer
    from ray_ensembles.sweep import m_curve

    m_max = max(args.num_members)
    loss, schedule = toy_recipe(args)
    rows, series, errors, best = [], {}, {}, None
    for eps in args.adversarial_eps:
        common = dict(num_members=m_max, hidden_dim=args.hidden_dim, depth=args.depth, seed=args.seed,
                      use_adversarial_training=eps > 0, adversarial_eps=eps, **loss)
        ensemble = DeepEnsembleClassifier(train.X.shape[1], num_classes(train, validation), **common) \
            if args.task == "classification" else DeepEnsemble(train.X.shape[1], **common)
        workers = max(1, min(m_max, int(ray.cluster_resources().get("GPU" if args.use_gpu else "CPU", 1)
                                        / (1 if args.use_gpu else args.cpus_per_worker))))
        Trainer(ensemble, train, train_batch_size=args.batch_size, train_lr=args.lr[0],
                train_num_epochs=args.epochs, progress=not (args.quiet or args.json), **schedule,
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=args.use_gpu,
                                             resources_per_worker={"CPU": args.cpus_per_worker,
                                                                   **({"GPU": 1} if args.use_gpu else {})}),
                run_config=RunConfig(storage_path=args.storage_path or str((output / "runs").resolve()),
                                     logging_config=LoggingConfig(log_level="INFO" if args.verbose else "WARNING"))).train()
        for row in m_curve(ensemble, validation.X, validation.y, seed=args.seed):
            rows.append({"adversarial_eps": eps, **row})
            series.setdefault(eps, []).append((row["num_members"], row["val_nll_mean"]))
            errors.setdefault(eps, []).append((row["num_members"], row["val_nll_std"]))
        if best is None or rows[-1]["val_nll_mean"] < best[0]:
            best = (rows[-1]["val_nll_mean"], ensemble)
    output.mkdir(parents=True, exist_ok=True)
    write_csv(rows, output / "m_curve.csv", ["num_members", "adversarial_eps", "val_nll_mean", "val_nll_std"])
    if args.json:
        print(json.dumps({"m_curve": rows}))
    else:
        print_table(rows, ["num_members", "adversarial_eps", "val_nll_mean", "val_nll_std", "num_subsets"])
    plot(series, output / "val_nll_vs_m.png", errors)
    best[1].save(output / "best_ensemble")


def main(argv=None):
    args = parse_args(argv)
    output = Path(args.output)
    try:
        space = resolve(args)
        train, validation = load_data(args, allow_no_validation=False)
        if args.lr is None:
            args.lr = [default_lr(args, len(train))]
        if args.storage_path:
            check_store(args.storage_path, "--storage-path", write=True)
        say(args, start_ray(args))
        if args.m_curve:
            run_m_curve(args, train, validation, output)
        else:
            run_sweep(args, space, train, validation, output)
    except (ValueError, TypeError) as err:
        fail(str(err))


if __name__ == "__main__":
    main()
