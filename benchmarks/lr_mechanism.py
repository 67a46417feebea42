#!/usr/bin/env python
"""Why Adam at the paper's learning rate of 0.1 fails with the plain Gaussian NLL: the evidence.

    python -m benchmarks.lr_mechanism          # Boston and Kin8nm, the paper's settings; about 2 minutes

Part 1 traces one ensemble (1 x 50 ReLU, batch 100, 40 epochs = 200 steps, M = 5) step by step,
on the training rows in standardised units: the loss, each member's gradient norm, its largest,
smallest and median predicted variance, the share of rows it gives a variance above 4 (four times
the target's), and the RMSE of its mean (1.0 = predicting the target's mean). Part 2 scores the
candidate causes and cures on the test rows of splits 0-4 (original units). Part 3 counts, on
Kin8nm's split 0 (2,950 steps), the hidden units that are dead (inactive on every training row,
so never updated again) as training goes, at three rates.
Results: benchmarks/results/lr_mechanism_{trace,candidates,dead_units}.csv.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from benchmarks.common import REPO, fail, load_uci, score, write_csv

from ray_ensembles import DeepEnsemble, TensorDataset
from ray_ensembles.model.heads import VARIANCE_FLOOR, mean_and_variance
from ray_ensembles.loop.training import EnsembleFit, TrainSettings, num_steps

DEAD_UNIT_STEPS = (10, 50, 100, 200, 500, 1000, 2000)
TRACE_STEPS = (1, 2, 3, 5, 10, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200)
# name -> (lr, nll_beta, cosine schedule, the change to the loop); each a candidate from the issue
CANDIDATES = {
    "paper: lr 0.1, plain NLL": (0.1, 0.0, False, None),
    "lr 0.1, warm-up of the rate over 100 steps": (0.1, 0.0, False, "warmup"),
    "lr 0.1, the mean alone (variance fixed at 1) for 20 steps": (0.1, 0.0, False, "mean_first"),
    "lr 0.1, MSE (no variance)": (0.1, 0.0, False, "mse"),
    "lr 0.1, beta-NLL 0.5": (0.1, 0.5, False, None),
    "lr 0.1, beta-NLL 1": (0.1, 1.0, False, None),
    "lr 0.1, beta-NLL 1, cosine": (0.1, 1.0, True, None),
    "lr 0.01, plain NLL": (0.01, 0.0, False, None),
}


def squared_error(out, ys):
    """Half the squared error of the mean head: the NLL with the variance fixed at 1, less a constant."""
    return 0.5 * (out[..., :1] - ys).square().sum(-1).mean(-1)


def fit_for(X, y, lr, nll_beta, cosine, change=None, epochs=40):
    ensemble = DeepEnsemble(X.shape[1], 1, num_members=5, hidden_dim=50, depth=1, seed=0, nll_beta=nll_beta)
    ensemble.fit_normalization(X, y)
    settings = TrainSettings(batch_size=100, lr=lr, lr_scheduler=cosine,
                             num_steps=num_steps(len(X), 100, None, epochs))
    fit = EnsembleFit(ensemble, TensorDataset(X, y), settings, "cpu")
    if change == "warmup":
        object.__setattr__(fit.settings, "lr_at", lambda step: lr * min(1.0, (step + 1) / 100))
    elif change == "mse":
        ensemble.head.loss = squared_error
    elif change == "mean_first":
        plain = ensemble.head.loss
        ensemble.head.loss = lambda out, ys: plain(out, ys) if fit.step >= 20 else squared_error(out, ys)
    return ensemble, fit


def trace(X, y, lr, nll_beta) -> list[dict]:
    ensemble, fit = fit_for(X, y, lr, nll_beta, cosine=False)
    rows = []
    while fit.step < fit.settings.num_steps:
        losses = fit.train_step()
        if fit.step not in TRACE_STEPS:
            continue
        grad = ensemble.members.grad_norms()  # of the step just taken
        with torch.no_grad():
            mean, var = mean_and_variance(ensemble.members(fit.batches.xs.expand(5, -1, -1)))
        rows.append({"lr": lr, "nll_beta": nll_beta, "step": fit.step, "loss": float(losses.mean()),
                     "grad_norm_max": float(grad.max()), "var_max": float(var.max()),
                     "var_min": float(var.min()), "var_median": float(var.median()),
                     "rows_var_above_4": float((var > 4).float().mean(1).max()),
                     "rmse_of_mean_max": float((mean - fit.batches.ys).square().mean((1, 2)).sqrt().max())})
    return rows


def dead_units(X, y, lr) -> list[dict]:
    ensemble, fit = fit_for(X, y, lr, nll_beta=1.0, cosine=True)
    rows = []
    while fit.step < fit.settings.num_steps:
        fit.train_step()
        if fit.step in DEAD_UNIT_STEPS or fit.step == fit.settings.num_steps:
            with torch.no_grad():
                hidden = torch.baddbmm(ensemble.members.biases[0], fit.batches.xs.expand(5, -1, -1), ensemble.members.weights[0])
            dead = (hidden <= 0).all(1).sum(-1)  # (M,) of 50
            rows.append({"lr": lr, "step": fit.step, "dead_units_mean": float(dead.float().mean()),
                         "dead_units_max": int(dead.max())})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "uci"))
    p.add_argument("--output", default="outputs/lr_mechanism")
    args = p.parse_args(argv)
    folder = Path(args.data_dir) / "bostonHousing"
    if not all((Path(args.data_dir) / name / "data.txt").exists() for name in ("bostonHousing", "kin8nm")):
        fail(f"The '--data-dir' option must hold bostonHousing/ and kin8nm/ in the UCI_Datasets layout. "
             f"Got {args.data_dir!r} instead.")
    torch.set_num_threads(1)
    data, features, target, splits = load_uci(folder, 5)
    X, y = torch.from_numpy(data[:, features]), torch.from_numpy(data[:, [target]])
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    train = torch.from_numpy(splits[0][0])
    traces = [r for lr, beta in [(0.1, 0.0), (0.1, 1.0), (0.01, 0.0)] for r in trace(X[train], y[train], lr, beta)]
    write_csv(traces, output / "lr_mechanism_trace.csv")
    print(f"Part 1: Boston split 0, standardised units; the variance floor is {VARIANCE_FLOOR:g}; largest over members")
    print(table(traces, list(traces[0])))

    candidates = []
    for name, (lr, beta, cosine, change) in CANDIDATES.items():
        scores = []
        for train_rows, test_rows in splits:
            train_rows, test_rows = torch.from_numpy(train_rows), torch.from_numpy(test_rows)
            ensemble, fit = fit_for(X[train_rows], y[train_rows], lr, beta, cosine, change)
            fit.run()
            scores.append(score(ensemble.eval(), X[test_rows], y[test_rows]))
        candidates.append({"candidate": name, **{m: statistics.fmean(s[m] for s in scores)
                                                 for m in ("rmse", "nll", "nll_mixture")}})
    write_csv(candidates, output / "lr_mechanism_candidates.csv")
    print(f"\nPart 2: Boston test rows, splits 0-{len(splits) - 1}, original units (mean over splits)")
    print(table(candidates, ["candidate", "rmse", "nll", "nll_mixture"]))

    data, features, target, splits = load_uci(Path(args.data_dir) / "kin8nm", 1)
    train = torch.from_numpy(splits[0][0])
    X, y = torch.from_numpy(data[train][:, features]), torch.from_numpy(data[train][:, [target]])
    dead = [r for lr in (0.1, 0.03, 0.01) for r in dead_units(X, y, lr)]
    write_csv(dead, output / "lr_mechanism_dead_units.csv")
    print("\nPart 3: Kin8nm split 0, beta-NLL 1, cosine: dead hidden units of 50 per member")
    print(table(dead, list(dead[0])))


def table(rows, keys) -> str:
    cell = (lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows])


if __name__ == "__main__":
    main()
