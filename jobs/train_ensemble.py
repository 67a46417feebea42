#!/usr/bin/env python
"""Train a deep ensemble on Ray Train workers, then save and evaluate it.

With no arguments: the paper's toy problem (y = x^3 + N(0, 3^2), 20 points on [-4, 4]), 5
members, on a local Ray (or the cluster in RAY_ADDRESS), with a plot of mean +/- 3 sigma.

    python jobs/train_ensemble.py
    python jobs/train_ensemble.py --data s3://bucket/table.parquet --target price --num-workers 4 --use-gpu
    python jobs/train_ensemble.py --data images.npz --task classification --member-factory models:cnn --augment crop,flip
    ray job submit --working-dir . -- python jobs/train_ensemble.py --data ... --target ...

Errors in the options or the data are reported in one line, before Ray starts any worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

from common import (TOY, add_console_arguments, add_data_arguments, arrow_dataset, default_lr, exclusive_output, fail,
                    import_callable, load_data, loggers, num_classes, read_dataset, resume_command, say, start_ray)



# Tables keep the defaults chosen on the UCI benchmark, in and out of distribution (TOY: common.py)
TABLE = dict(epochs=40, lr=None, nll_beta=1.0, lr_schedule="cosine")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(p).add_argument(
        "--streaming", action="store_true",
        help="read --data with Ray Data as it trains, for tables larger than memory: every member streams every "
             "row, in windows of --shuffle-buffer-rows; no rows are held out for validation (README)")
    model = p.add_argument_group("ensemble")
    model.add_argument("--num-members", type=int, default=5)
    model.add_argument("--hidden-dim", type=int, default=None, help="default 100 on the toy, else 50")
    model.add_argument("--depth", type=int, default=1, help="number of hidden layers")
    model.add_argument("--adversarial-eps", type=float, default=0.0,
                       help="FGSM step as a fraction of each input's range; 0 turns it off")
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--num-classes", type=int, default=None,
                       help="classification: default one more than the largest label (required with --streaming)")
    model.add_argument("--member-factory", default=None, metavar="MODULE:FUNCTION",
                       help="build each member with this callable (an nn.Module taking (B, *input shape)), "
                            "importable from the working directory; --hidden-dim and --depth then do not apply")
    model.add_argument("--nll-beta", type=float, default=None,
                       help="regression: weight each row's NLL gradient by its variance^beta; 0 is the paper's plain "
                            "NLL (default 0 on the toy, else 1)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=None, help="default 40")
    train.add_argument("--batch-size", type=int, default=None, help="default 20 on the toy, else 100")
    train.add_argument("--lr", type=float, default=None,
                       help="default 0.1 on the toy, else 0.1 up to 200 steps and 0.1 * sqrt(200 / steps) beyond")
    train.add_argument("--lr-schedule", choices=["cosine", "constant"], default=None,
                       help="cosine anneals the rate to 0 over the run; the paper's is constant (default constant "
                            "on the toy, else cosine)")
    train.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up of the rate before its schedule")
    train.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default="adam",
                       help="each member's own; adamw decouples --weight-decay")
    train.add_argument("--momentum", type=float, default=0.9, help="with --optimizer sgd")
    train.add_argument("--nesterov", action="store_true", help="with --optimizer sgd: Nesterov's momentum")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--augment", default=None, metavar="crop[=PADDING],flip",
                       help="per-member image augmentation of the training batches: random crops (padding "
                            "4 unless given) and horizontal flips")
    train.add_argument("--ema-decay", type=float, default=0.0)
    train.add_argument("--amp", action="store_true", help="bfloat16 autocast (on GPUs)")
    train.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps")
    train.add_argument("--shuffle-buffer-rows", type=int, default=1 << 20,
                       help="with --streaming, rows mix within windows of this many (README, 'Tables larger than memory')")
    ray_opts = p.add_argument_group("Ray")
    ray_opts.add_argument("--num-workers", type=int, default=None,
                          help="Ray Train workers (default: one per member, up to the cluster's GPUs or CPUs)")
    ray_opts.add_argument("--cpus-per-worker", type=float, default=None,
                          help="default 1, or with --streaming what leaves Ray Data one CPU of the cluster")
    ray_opts.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    ray_opts.add_argument("--storage-path", default=None,
                          help="Ray run storage: local path or s3:// / gs:// / NFS (default: OUTPUT/runs)")
    ray_opts.add_argument("--name", default=None, help="run name (default: unique)")
    ray_opts.add_argument("--resume", action="store_true", help="continue the run called --name")
    ray_opts.add_argument("--max-failures", type=int, default=0, help="worker failures to survive")
    p.add_argument("--output", default="outputs/train_ensemble", help="where the ensemble, metrics and plot go")
    p.add_argument("--smoke-test", action="store_true", help="a few seconds of training, for CI")
    add_console_arguments(p)
    return p.parse_args(argv)


def build(args):
    from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier
    from ray_ensembles.io import directories, storage
    from ray_ensembles.io.locations import is_uri

    toy = args.data is None
    if args.smoke_test:
        args.num_members, args.epochs = min(args.num_members, 2), 5
    defaults = dict(hidden_dim=100 if toy else 50, batch_size=20 if toy else 100, **(TOY if toy else TABLE))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_workers is not None and not 1 <= args.num_workers <= args.num_members:
        raise ValueError(f"The '--num-workers' option must be in [1, --num-members={args.num_members}]. "
                         f"Got {args.num_workers} instead.")
    if args.max_failures < 0:
        raise ValueError(f"The '--max-failures' option must be >= 0. Got {args.max_failures} instead.")
    if args.resume and not args.name:
        raise ValueError("The '--resume' option needs the '--name' of the run to resume. Got no name instead.")
    if args.cpus_per_worker is not None and not args.cpus_per_worker > 0:
        raise ValueError(f"The '--cpus-per-worker' option must be > 0. Got {args.cpus_per_worker} instead.")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"The '--output' option must be a folder. Got {args.output!r}, a file, instead.")
    directories.check_writable(output / "ensemble", is_ours=storage.is_ensemble_directory, what="an ensemble",
                               protect=[args.data] if args.data and not is_uri(args.data) else [])
    if args.streaming and args.data is None:
        raise ValueError("The '--streaming' option reads the table in --data. Got no --data instead.")
    if args.streaming and args.task == "classification" and args.num_classes is None:
        raise ValueError("The '--num-classes' option is required with --streaming --task classification "
                         "(the labels are not read before training). Got nothing instead.")
    if args.member_factory is not None:
        args.member_factory = import_callable(args.member_factory, "--member-factory")
    args.augment = parse_augment(args.augment)
    train, validation = load_data(args)  # with --streaming, the table's first rows
    args.num_rows = arrow_dataset(args.data).count_rows() if args.streaming else len(train)
    if args.lr is None:
        args.lr = default_lr(args, args.num_rows)
    common = dict(num_members=args.num_members, hidden_dim=args.hidden_dim, depth=args.depth,
                  use_adversarial_training=args.adversarial_eps > 0, adversarial_eps=args.adversarial_eps,
                  seed=args.seed, member_factory=args.member_factory)
    dim_in = train.X.shape[1] if train.X.ndim == 2 else list(train.X.shape[1:])
    if args.task == "classification":
        ensemble = DeepEnsembleClassifier(dim_in, args.num_classes or num_classes(train, validation), **common)
    else:
        ensemble = DeepEnsemble(dim_in, train.y.shape[1] if train.y.ndim == 2 else 1, **common, nll_beta=args.nll_beta)
    return ensemble, train, validation


def parse_augment(spec: str | None):
    """--augment's transform: "crop[=padding]" and "flip", comma-separated, applied in the order given."""
    from ray_ensembles.loop.augmentation import Compose, RandomCrop, RandomHorizontalFlip

    if spec is None:
        return None
    transforms = []
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if name == "crop" and (not value or value.isdigit() and int(value) > 0):
            transforms.append(RandomCrop(int(value or 4)))
        elif name == "flip" and not value:
            transforms.append(RandomHorizontalFlip())
        else:
            raise ValueError(f"The '--augment' option must be crop[=padding] and flip, comma-separated. Got {spec!r} instead.")
    return transforms[0] if len(transforms) == 1 else Compose(*transforms)


def scaling(args):
    import ray
    from ray.train import ScalingConfig

    from ray_ensembles.on_ray.cluster import autoscaling

    have = ray.cluster_resources()
    cpus = have.get("CPU", 1) - args.streaming  # a streaming run leaves a CPU to Ray Data's read tasks
    if args.num_workers is None:
        slots = have.get("GPU", 0) if args.use_gpu else cpus / (args.cpus_per_worker or 1.0)
        args.num_workers = max(1, min(args.num_members, int(slots)))
    if args.cpus_per_worker is None:  # 1, or the share of the CPUs left that the workers fit in
        share = cpus / args.num_workers
        args.cpus_per_worker = 1.0 if not args.streaming or share >= 1 or share <= 0 else math.floor(share * 100) / 100
    need = args.num_workers * args.cpus_per_worker
    if not args.use_gpu and need > cpus + 1e-9 and not autoscaling():
        raise ValueError(f"The '--num-workers' and '--cpus-per-worker' options must fit the Ray cluster's "
                         f"{have.get('CPU', 0):g} CPUs" + (", less 1 for Ray Data's reads with --streaming" if args.streaming
                                                         else "") + f". Got {args.num_workers} x {args.cpus_per_worker:g} instead.")
    per_worker = {"CPU": args.cpus_per_worker}
    if args.use_gpu:
        per_worker["GPU"] = 1
    return ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu, resources_per_worker=per_worker)


def run_config(args, output: Path):
    import pyarrow.fs
    from ray.train import FailureConfig, LoggingConfig, RunConfig

    from ray_ensembles.io.locations import check_store, filesystem_for

    storage = args.storage_path or str((output / "runs").resolve())
    check_store(storage, "--storage-path", write=True)
    if args.name:
        filesystem, root = filesystem_for(storage, "--storage-path")
        exists = filesystem.get_file_info(f"{root}/{args.name}").type != pyarrow.fs.FileType.NotFound
        if exists and not args.resume:
            raise ValueError(f"The '--name' option names a run that exists in {storage}; pass --resume "
                             f"to continue it or choose another name. Got {args.name!r} instead.")
        if args.resume and not exists:
            raise ValueError(f"The '--resume' option needs an existing run; {storage} has none "
                             f"called {args.name!r}.")
    return RunConfig(name=args.name, storage_path=storage,
                     failure_config=FailureConfig(max_failures=args.max_failures),
                     logging_config=LoggingConfig(log_level="INFO" if args.verbose else "WARNING"))


def placement(trainer, streaming: bool) -> str:
    """Which worker trains which members, on what."""
    from ray_ensembles.on_ray.distributed import resources_per_worker
    from ray_ensembles.loop.placement import assign_members

    sc = trainer.scaling_config
    groups = assign_members(trainer.ensemble.member_ids, sc.num_workers)
    per_worker = ", ".join(f"{v:g} {k}" for k, v in resources_per_worker(sc).items())
    return (f"training {trainer.ensemble.num_members} members for {trainer.settings.num_steps} steps "
            f"on {sc.num_workers} Ray Train worker{'s' * (sc.num_workers != 1)} ({per_worker} each"
            + ("; 1 CPU left to reading the table" if streaming else "") + "): "
            + " | ".join(",".join(map(str, g)) for g in groups))


def report(trainer, output: Path, args):
    metrics = trainer.metrics
    summary = {"metrics": metrics, "history": trainer.history, "placement": trainer.placement,
               "timings": trainer.timings, "checkpoint": str(trainer.checkpoint_path),
               "ensemble": str(output / "ensemble")}
    (output / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    if args.json:
        print(json.dumps({k: summary[k] for k in ("metrics", "placement", "timings", "checkpoint", "ensemble")},
                         default=str))
        return
    print(f"\n{'member':>6} {'seed':>20} {'train loss':>11} {'val NLL':>9}  worker, node, device (Ray's GPU ids)")
    for i, (m, row) in enumerate(metrics["members"].items()):
        where = trainer.placement[m]
        gpus = f" ({','.join(where['gpu_ids'])})" if where["gpu_ids"] else ""
        val_nll = f"{row['val_nll']:>9.4f}" if "val_nll" in row else f"{'-':>9}"
        print(f"{m:>6} {trainer.ensemble.member_seeds[i]:>20} {row['train_loss']:>11.4f} "
              f"{val_nll}  {where['rank']}, {where['node_id'][:8]}, {where['device']}{gpus}")
    summary = {k: v for k, v in metrics.items() if k != "members"}
    if summary:
        print("ensemble: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    else:
        print("ensemble: no validation rows" + (" (--streaming trains on every row)" if args.streaming else ""))


def plot_toy(ensemble, train, path: Path):
    import matplotlib
    import torch
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.linspace(-6, 6, 400).unsqueeze(1)
    pred = ensemble(x)
    mean, std = pred.mean.squeeze(1), pred.stddev.squeeze(1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, x ** 3, "b-", lw=1, label="y = x^3")
    ax.fill_between(x.squeeze(1), mean - 3 * std, mean + 3 * std, color="gray", alpha=0.3, label="+/- 3 sigma")
    ax.plot(x, mean, "k-", label=f"ensemble mean (M={ensemble.num_members})")
    ax.plot(train.X, train.y, "r.", ms=8, label="training data")
    ax.set(xlim=(-6, 6), ylim=(-200, 200), xlabel="x", ylabel="y")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    from ray_ensembles import Trainer
    from ray_ensembles.on_ray.distributed import new_run_name

    output, config = Path(args.output), None
    with contextlib.ExitStack() as held:
        try:
            ensemble, train, validation = build(args)
            options = dict(train_batch_size=args.batch_size, train_lr=args.lr, train_num_epochs=args.epochs,
                           lr_scheduler=args.lr_schedule == "cosine", warmup_steps=args.warmup_steps,
                           optimizer=args.optimizer, momentum=args.momentum, nesterov=args.nesterov,
                           weight_decay=args.weight_decay, augment=args.augment,
                           ema_decay=args.ema_decay, amp=args.amp, save_every=args.save_every,
                           validation_dataset=validation, progress=not (args.quiet or args.json))
            options.update(shuffle_buffer_rows=args.shuffle_buffer_rows)
            Trainer.check(ensemble, train, **options)  # before Ray starts
            args.name = args.name or new_run_name()  # named here, so that an interrupted run says how to resume
            config = run_config(args, output)  # --name and --resume too
            trackers = loggers(args, args.name)
            held.enter_context(exclusive_output(output))  # until its files are written: one run at a time
            where = start_ray(args)
            data = dict(dataset=train) if not args.streaming else \
                dict(dataset=read_dataset(args.data), target=args.target, features=train.feature_names)
            trainer = Trainer(ensemble, **data, **options, scaling_config=scaling(args), run_config=config,
                              loggers=trackers)
            say(args, where, placement(trainer, args.streaming))
            trainer.train()
            if validation is not None:  # rows it never trained on: the saved ensemble's conformal intervals or sets
                ensemble.conformalize(validation.X, validation.y)
        except KeyboardInterrupt:
            if config is None:
                fail("interrupted before training started", status=130)
            fail(f"interrupted: the run's checkpoints so far are in {config.storage_path}/{config.name}; resume "
                 f"with: {resume_command(config.name)}", status=130)
        except (ValueError, TypeError) as err:
            fail(str(err))
        except OSError as err:  # the store, during the run: the message names it (check_storage_after)
            fail(" ".join(str(err).split()), status=1)
        except FloatingPointError as err:  # trained, but cannot predict: the message says where the run is
            fail(str(err), status=1)
        ensemble.save(output / "ensemble")
        report(trainer, output, args)
        if args.data is None:
            plot_toy(ensemble, train, output / "toy.png")
    if not args.json:
        print(f"saved the ensemble to {output / 'ensemble'} (run checkpoint: {trainer.checkpoint_path})")


if __name__ == "__main__":
    main()
