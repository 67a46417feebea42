"""What the benchmarks share: where they run and save, the UCI index files, scoring, one-line
errors. Benchmarks run from the repository root: `python -m benchmarks.<name>`."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ray_ensembles.model.metrics import gaussian_nll, mixture_gaussian_nll, rmse

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def fail(message: str):
    """Exit with one line, as the jobs do, for bad options and data."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_uci(folder: Path, max_splits: int | None = None):
    """(data, feature columns, target column, [(train rows, test rows), ...]) from the index files."""
    data = np.loadtxt(folder / "data.txt", ndmin=2)
    features = np.loadtxt(folder / "index_features.txt", dtype=int, ndmin=1).tolist()
    target = int(np.loadtxt(folder / "index_target.txt", dtype=int))
    n_splits = int(np.loadtxt(folder / "n_splits.txt")) if (folder / "n_splits.txt").exists() else \
        len(list(folder.glob("index_train_*.txt")))
    splits = [(np.loadtxt(folder / f"index_train_{k}.txt", dtype=int), np.loadtxt(folder / f"index_test_{k}.txt", dtype=int))
              for k in range(min(n_splits, max_splits or n_splits))]
    return data, features, target, splits


def score(ensemble, X, y) -> dict:
    pred = ensemble(X)
    return {"rmse": rmse(pred.mean, y), "nll": gaussian_nll(pred.mean, pred.variance, y),
            "nll_mixture": mixture_gaussian_nll(pred.member_mean, pred.member_variance, y)}


def interval_columns(lower, upper, y, prefix: str, level: float) -> dict:
    """`<prefix>coverage_<level %>` and `<prefix>width_<level %>`: the share of the rows y inside
    the interval, and its mean width."""
    percent = round(level * 100)
    return {f"{prefix}coverage_{percent}": ((y >= lower) & (y <= upper)).double().mean().item(),
            f"{prefix}width_{percent}": (upper - lower).double().mean().item()}


def write_csv(rows, path: Path):
    """Rows of dicts as CSV; a column some rows lack is empty there."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


def unstacked(ensemble, dims) -> list[nn.Sequential]:
    """One plain nn.Module per member of a stacked ensemble, with the same weights."""
    nets = [nn.Sequential(*[layer for i, o in zip(dims[:-1], dims[1:]) for layer in (nn.Linear(i, o), nn.ReLU())][:-1])
            for _ in range(ensemble.num_members)]
    with torch.no_grad():
        for m, net in enumerate(nets):
            for k, linear in enumerate(net[::2]):
                linear.weight.copy_(ensemble.members.weights[k][m].T)
                linear.bias.copy_(ensemble.members.biases[k][m, 0])
    return nets
