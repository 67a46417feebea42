"""What the jobs share: the data options, the built-in toy data, one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ray_ensembles import TensorDataset  # noqa: E402
from ray_ensembles.data import read_table, table_to_dataset  # noqa: E402


def add_data_arguments(parser):
    data = parser.add_argument_group("data (default: the paper's toy cubic problem)")
    data.add_argument("--data", help="Parquet or CSV file: local path or URI (s3://, gs://, ...)")
    data.add_argument("--target", help="target column (required with --data)")
    data.add_argument("--features", help="comma-separated feature columns (default: every other numeric column)")
    data.add_argument("--task", choices=["regression", "classification"], default="regression")
    data.add_argument("--validation-fraction", type=float, default=0.1,
                      help="share of the TRAINING rows held out for validation metrics")


def toy_data(n: int, seed: int) -> TensorDataset:
    """The paper's Figure 1: x ~ U[-4, 4], y = x^3 + N(0, 3^2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 8 - 4
    return TensorDataset(x, x ** 3 + 3 * torch.randn(n, 1, generator=g), feature_names=["x"])


def load_data(args, allow_no_validation: bool = True):
    """(train, validation) datasets, checked before any Ray work. The toy problem's validation
    set is a fresh sample of the same distribution; a table's is carved from its rows."""
    if args.data is None:
        return toy_data(20, args.seed), toy_data(1000, args.seed + 1)
    if not args.target:
        raise ValueError("The '--target' option is required with --data. Got nothing instead.")
    features = args.features.split(",") if args.features else None
    dataset = table_to_dataset(read_table(args.data), args.target, features, args.task)
    if args.validation_fraction == 0 and allow_no_validation:
        return dataset, None
    return dataset.split(args.validation_fraction, seed=args.seed)


def num_classes(*datasets) -> int:
    return max(2, max(int(d.y.max()) for d in datasets if d is not None) + 1)


def fail(message: str):
    """Exit with one line: the jobs' contract for bad options and data."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
