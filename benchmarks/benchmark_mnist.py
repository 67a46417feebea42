#!/usr/bin/env python
"""MNIST classification and NotMNIST out-of-distribution: the paper's Figures 2a, 3 and 6.

    python -m benchmarks.benchmark_mnist                       # plain, adversarial, random; M = 1, 5, 10
    python -m benchmarks.benchmark_mnist --variants adversarial --num-members 5 --epochs 20

Members: 3 hidden layers of 200 ReLU units with batch normalisation, trained on Ray workers.
Variants: a plain ensemble, adversarial training (FGSM, eps = 1% of each input's range), and the
paper's control, a random-sign perturbation of the same size. Each variant trains max(M) members
once; the ensemble of size M is its first M members (members are i.i.d.).

Convnet rows (`--cnn-epochs`): M = max(--num-members) members of a small CNN (two 3x3 conv layers
of 16 and 32 channels and a linear head, built by `member_factory`) on the images as they are,
(N, 1, 28, 28), trained with SGD (Nesterov momentum 0.9, weight decay 5e-4, rate 0.05 with a
linear warm-up over 200 steps and a cosine decay): "cnn" without augmentation, "cnn_crop" with random crops
(padding 2) drawn per member, "cnn_crop_adversarial" with the crops and FGSM (eps 1% of each channel's range),
"wide_cnn_crop" with the crops and a CNN of twice the channels (32 and 64).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from benchmarks.common import REPO, fail
from torch import nn

from ray_ensembles import DeepEnsembleClassifier, RandomCrop, TensorDataset, Trainer
from ray_ensembles.model import metrics as M

DATA = REPO.parent / "shared" / "data"
VARIANTS = {"plain": {}, "adversarial": {"use_adversarial_training": True},
            "random": {"use_adversarial_training": True, "perturbation": "random"}}
THRESHOLDS = [round(0.1 * k, 1) for k in range(10)]  # Figure 6's confidence thresholds tau
PAPER = "error 1.0-1.8%, NLL 0.02-0.14, Brier 0.0014-0.0030 (Figure 2a, M = 1..15)"


def convnet(first: int, second: int) -> nn.Sequential:
    """The convnet rows' member: two 3x3 conv layers of `first` and `second` channels, a linear head."""
    return nn.Sequential(nn.Conv2d(1, first, 3, padding=1), nn.BatchNorm2d(first), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(first, second, 3, padding=1), nn.BatchNorm2d(second), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(second * 7 * 7, 10))


def small_cnn():
    return convnet(16, 32)


def wide_cnn():  # twice the channels, for the error goal (docs/benchmarks.md)
    return convnet(32, 64)


# the convnet rows' training: SGD with Nesterov momentum, warm-up and cosine decay
CNN_TRAINING = dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4, train_lr=0.05, lr_scheduler=True)
CNN_WARMUP_STEPS = 200  # or a tenth of a shorter run
# row: (member, ensemble options, augmentation); FGSM is what took the MLP's NotMNIST AUROC from 0.74 to 0.999
CNN_ROWS = {"cnn": (small_cnn, {}, None), "cnn_crop": (small_cnn, {}, RandomCrop(2)),
            "cnn_crop_adversarial": (small_cnn, {"use_adversarial_training": True}, RandomCrop(2)),
            "wide_cnn_crop": (wide_cnn, {}, RandomCrop(2))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA / "mnist" / "mnist.npz"))
    p.add_argument("--ood-data", default=str(DATA / "notmnist" / "notmnist_test10k.npz"),
                   help="any npz with an x_test array of 28x28 images")
    p.add_argument("--variants", default="plain,adversarial,random", help="MLP variants; empty: the convnet rows only")
    p.add_argument("--num-members", default="1,5,10")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--adversarial-eps", type=float, default=0.01)
    p.add_argument("--cnn-epochs", type=int, default=3, help="epochs of the convnet rows (0: none)")
    p.add_argument("--cnn-rows", default=",".join(CNN_ROWS), help="which convnet rows")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="outputs/benchmark_mnist")
    p.add_argument("--smoke-test", action="store_true", help="5000 training images, three epochs (the convnet rows: 1000, one)")
    return p.parse_args(argv)


def load_images(path: str, split: str, labels: bool = True):
    """(N, 784) floats in [0, 1] (and labels) from an npz with x_<split> of 28x28 images."""
    try:
        with np.load(path) as data:
            if f"x_{split}" not in data:
                raise ValueError(f"The file {path!r} has no 'x_{split}' array (it has {sorted(data)}).")
            x = data[f"x_{split}"]
            y = data[f"y_{split}"] if labels else None
    except (OSError, EOFError) as err:
        raise ValueError(f"The file {path!r} is not a readable npz ({err}).") from None
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"The images in {path!r} must be 28x28 to match dim_in=784. Got shape {x.shape} instead.")
    x = torch.from_numpy(x.reshape(len(x), 784).astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0))
    if labels:
        if y.dtype.kind not in "iu" or y.min() < 0 or y.max() > 9:
            raise ValueError(f"The labels y_{split} in {path!r} must be integers in [0, 10). "
                             f"Got dtype {y.dtype}, range [{y.min()}, {y.max()}] instead.")
        return x, torch.from_numpy(y.astype(np.int64))
    return x


def evaluate(member_probs, y, ood_member_probs) -> dict:
    """Metrics of one ensemble from its members' probabilities on the test and OOD sets."""
    from ray_ensembles.model.predictions import CategoricalPrediction
    test, ood = CategoricalPrediction(member_probs), CategoricalPrediction(ood_member_probs)
    return {"error": 1 - M.accuracy(test.probs, y), "nll": M.classification_nll(test.probs, y),
            "brier": M.brier_score(test.probs, y), "ece": M.expected_calibration_error(test.probs, y),
            "auroc_entropy": M.auroc(test.entropy, ood.entropy),
            "auroc_mi": M.auroc(test.mutual_information, ood.mutual_information),
            "_entropy_in": test.entropy.squeeze(1), "_entropy_out": ood.entropy.squeeze(1),
            "_confidence": torch.cat([test.probs.max(-1).values, ood.probs.max(-1).values]),
            "_correct": torch.cat([(test.probs.argmax(-1) == y).float(), torch.zeros(len(ood.probs))])}


def accuracy_vs_confidence(row) -> list[float]:
    """Figure 6: accuracy on the mixed set's rows with confidence >= tau (OOD rows count as wrong)."""
    out = []
    for tau in THRESHOLDS:
        keep = row["_confidence"] >= tau
        out.append(row["_correct"][keep].mean().item() if keep.any() else float("nan"))
    return out


def train_variant(name, options, x, y, args, factory=None, epochs=None, training=None):
    """An ensemble of max(M) members trained on Ray workers: the paper's MLP on flattened images
    with its constant rate, or with `factory` a convnet on the images with `training`'s options."""
    from ray.train import RunConfig, ScalingConfig

    m_max = max(args.members)
    ensemble = DeepEnsembleClassifier(784 if factory is None else [1, 28, 28], 10, num_members=m_max, hidden_dim=200,
                                      depth=3, batch_norm=True, adversarial_eps=args.adversarial_eps, seed=args.seed,
                                      member_factory=factory, **options)
    # the paper's constant rate, as its results in docs/benchmarks.md were measured
    training = training or dict(train_lr=args.lr, lr_scheduler=False)
    if factory is not None:
        steps = (epochs or args.epochs) * -(-len(x) // args.batch_size)
        training = dict(training, warmup_steps=min(CNN_WARMUP_STEPS, steps // 10))
    start = time.perf_counter()
    Trainer(ensemble, TensorDataset(x if factory is None else x.view(-1, 1, 28, 28), y), train_batch_size=args.batch_size,
            train_num_epochs=epochs or args.epochs, save_every=10 ** 9, **training,
            scaling_config=ScalingConfig(num_workers=min(args.num_workers, m_max),
                                         resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str((Path(args.output) / "runs").resolve()))).train()
    return ensemble, time.perf_counter() - start


def plot_metrics(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, metric in zip(axes, ["error", "nll", "brier", "ece"]):
        for variant in dict.fromkeys(r["variant"] for r in rows if not r["variant"].startswith("cnn")):
            points = [(r["num_members"], r[metric]) for r in rows if r["variant"] == variant]
            ax.plot(*zip(*points), marker="o", label=variant)
        ax.set(title=metric, xlabel="M")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_entropy(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = list(dict.fromkeys(r["variant"] for r in rows if not r["variant"].startswith("cnn")))
    sizes = sorted({r["num_members"] for r in rows if not r["variant"].startswith("cnn")})
    fig, axes = plt.subplots(len(variants), len(sizes), figsize=(3.2 * len(sizes), 2.6 * len(variants)),
                             squeeze=False)
    bins = np.linspace(0, np.log(10), 30)
    for i, variant in enumerate(variants):
        for j, m in enumerate(sizes):
            row = next(r for r in rows if r["variant"] == variant and r["num_members"] == m)
            ax = axes[i][j]
            ax.hist(row["_entropy_in"].numpy(), bins, alpha=0.6, density=True, label="MNIST (known)")
            ax.hist(row["_entropy_out"].numpy(), bins, alpha=0.6, density=True, label="NotMNIST (unknown)")
            ax.set(title=f"{variant}, M={m}", xlabel="predictive entropy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confidence(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        if not r["variant"].startswith("cnn"):
            ax.plot(THRESHOLDS, r["acc_vs_conf"], marker=".", label=f"{r['variant']} M={r['num_members']}")
    ax.set(xlabel="confidence threshold tau", ylabel="accuracy on rows with confidence >= tau",
           title="MNIST + NotMNIST")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        args.members = [int(v) for v in args.num_members.split(",")]
        variants = [v for v in args.variants.split(",") if v]  # empty: the convnet rows alone
        if any(v not in VARIANTS for v in variants):
            raise ValueError(f"The '--variants' option must be a comma list of {sorted(VARIANTS)}. Got {args.variants!r} instead.")
        if any(r not in CNN_ROWS for r in args.cnn_rows.split(",")):
            raise ValueError(f"The '--cnn-rows' option must be a comma list of {sorted(CNN_ROWS)}. Got {args.cnn_rows!r} instead.")
        if not variants and not args.cnn_epochs:
            raise ValueError("The '--variants' option is empty and --cnn-epochs 0: nothing to train.")
        if min(args.members) < 1:
            raise ValueError(f"The '--num-members' option must list ints >= 1. Got {args.num_members!r} instead.")
        for option in ("epochs", "batch_size", "num_workers"):
            if getattr(args, option) < 1:
                raise ValueError(f"The '--{option.replace('_', '-')}' option must be >= 1. Got {getattr(args, option)} instead.")
        x_train, y_train = load_images(args.data, "train")
        x_test, y_test = load_images(args.data, "test")
        x_ood = load_images(args.ood_data, "test", labels=False)
    except ValueError as err:
        fail(str(err))
    if args.smoke_test:
        x_train, y_train, x_test, y_test, x_ood = x_train[:5000], y_train[:5000], x_test[:500], y_test[:500], x_ood[:500]
        args.epochs, args.cnn_epochs = 3, min(args.cnn_epochs, 1)
    output = Path(args.output)
    import ray
    if not ray.is_initialized():
        ray.init()

    rows, timings = [], {}
    runs = [(v, VARIANTS[v], None, args.epochs, None) for v in variants]
    if args.cnn_epochs:
        runs += [(row, options, member, args.cnn_epochs, dict(CNN_TRAINING, augment=augment))
                 for row in args.cnn_rows.split(",") for member, options, augment in [CNN_ROWS[row]]]
    for variant, options, factory, epochs, training in runs:
        used = slice(1000 if args.smoke_test and factory is not None else None)  # a smoke run's convnets: 1000 images
        ensemble, seconds = train_variant(variant, options, x_train[used], y_train[used], args, factory, epochs, training)
        timings[variant] = seconds
        shaped = (lambda x: x) if factory is None else (lambda x: x.view(-1, 1, 28, 28))
        probs = ensemble.predict(shaped(x_test)).member_probs           # (M, N, 10)
        ood_probs = ensemble.predict(shaped(x_ood)).member_probs
        sizes = [max(args.members)] if factory is not None else args.members
        for m in sizes:
            row = {"variant": variant, "num_members": m, **evaluate(probs[:m], y_test, ood_probs[:m])}
            row["acc_vs_conf"] = accuracy_vs_confidence(row)
            rows.append(row)
        if variant == "adversarial":
            ensemble.save(output / "adversarial_ensemble")
        print(f"{variant}: trained {ensemble.num_members} members in {seconds:.0f} s", flush=True)

    output.mkdir(parents=True, exist_ok=True)
    columns = ["variant", "num_members", "error", "nll", "brier", "ece", "auroc_entropy", "auroc_mi"]
    with (output / "mnist.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[r[c] for c in columns] for r in rows])
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |"
              for r in rows]
    conf = ["| variant | M | " + " | ".join(f"tau={t}" for t in THRESHOLDS) + " |", "|" + "---|" * (len(THRESHOLDS) + 2)]
    conf += [f"| {r['variant']} | {r['num_members']} | " + " | ".join(f"{a:.4f}" for a in r["acc_vs_conf"]) + " |"
             for r in rows]
    report = "\n".join(table) + "\n\nAccuracy vs confidence on MNIST + NotMNIST (Figure 6):\n\n" + "\n".join(conf) + \
        f"\n\nPaper: {PAPER}.\nTraining time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "\n"
    (output / "mnist.md").write_text(report)
    print(report)
    if variants:  # the figures are the MLP variants' against M; a run of convnet rows alone has none
        plot_metrics(rows, output / "metrics_vs_m.png")
        plot_entropy(rows, output / "entropy_histograms.png")
        plot_confidence(rows, output / "accuracy_vs_confidence.png")


if __name__ == "__main__":
    main()
