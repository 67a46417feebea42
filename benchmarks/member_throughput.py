#!/usr/bin/env python
"""Training throughput of user-built members: stacked layers vs torch.func vs the loop.

    python -m benchmarks.member_throughput [--steps 20] [--reps 3] [--threads 1] [--device cpu]

M = 5 members of three factory networks, one process, the same initial weights on every path,
forward + backward of the cross-entropy of every member's own batch (the training step's work;
the optimiser's fused update is the same on every path). Paths, interleaved round by round:

- `ours`: what the library builds for the factory (`build_members`): `StackedSequential` for a
  plain Sequential, the per-member loop for anything else;
- `torch.func`: `stack_module_state` + `vmap(functional_call)` over the members (batch norm
  without running statistics, as vmap needs: `replace_all_batch_norm_modules_`);
- `loop`: `FactoryMembers`, one module after another;
- `plain`: one `nn.Module` trained M times, no ensemble code at all (the floor of the loop).

Networks: a UCI-sized MLP (8 -> 50 -> 2, batch 64), the MNIST CNN of benchmarks/benchmark_mnist.py
(two 3x3 conv layers and a linear head, batch 64, 1x28x28) and a CIFAR-shaped ResNet-18-style
network (batch 16, synthetic 3x32x32). Also the cost of augmentation (RandomCrop(4) +
RandomHorizontalFlip on every member's batch) against the MNIST CNN's step. Prints images per
second per member and writes benchmarks/results/member_throughput.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

from benchmarks.common import RESULTS
from ray_ensembles.loop.augmentation import Compose, RandomCrop, RandomHorizontalFlip, augment_members
from ray_ensembles.model.members import FactoryMembers, build_member, build_members, member_seed

M = 5


def uci_mlp():
    return nn.Sequential(nn.Linear(8, 50), nn.ReLU(), nn.Linear(50, 2))


def mnist_cnn():
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 10))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (CIFAR's stem: one 3x3 convolution, no max pool)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


NETWORKS = {  # name: (factory, input shape, classes, batch, steps per --steps)
    "uci_mlp": (uci_mlp, (8,), 2, 64, 50),
    "mnist_cnn": (mnist_cnn, (1, 28, 28), 10, 64, 1),
    "resnet18": (ResNet18, (3, 32, 32), 10, 16, 1 / 8),
}


def paths(factory, shape, classes, device):
    """name -> step(xs (M, B, *shape), ys (M, B)): forward + backward, same initial weights."""
    seeds = [member_seed(0, m) for m in range(M)]
    ours = build_members("benchmark", seeds, shape, classes, 1, 1, "relu", False, factory).to(device)
    loop = FactoryMembers(factory, seeds).to(device)
    plain = [build_member(factory, s).to(device) for s in seeds]

    def loss(out, ys):
        return F.cross_entropy(out.flatten(0, 1), ys.flatten(), reduction="sum")

    def module_step(module):
        def step(xs, ys):
            module.zero_grad(set_to_none=True)
            loss(module(xs), ys).backward()
        return step

    def plain_step(xs, ys):
        for net, x, y in zip(plain, xs, ys):
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y, reduction="sum").backward()

    vmapped = [copy.deepcopy(n) for n in plain]
    for n in vmapped:
        torch.func.replace_all_batch_norm_modules_(n)
    params, buffers = torch.func.stack_module_state(vmapped)
    base = copy.deepcopy(vmapped[0]).to("meta")

    def one(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))

    def func_step(xs, ys):
        for p in params.values():
            p.grad = None
        loss(torch.vmap(one)(params, buffers, xs), ys).backward()

    return {"ours": module_step(ours), "torch.func": func_step, "loop": module_step(loop), "plain": plain_step,
            "ours is": type(ours).__name__}


def measure(step, xs, ys, steps: int) -> float:
    step(xs, ys)  # warm-up: allocations, first-call paths
    synchronize(xs.device)
    start = time.perf_counter()
    for _ in range(steps):
        step(xs, ys)
    synchronize(xs.device)
    return time.perf_counter() - start


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    results = {"members": M, "threads": args.threads, "device": args.device, "steps": args.steps, "networks": {}}
    print(f"M = {M}, {args.threads} thread(s), {args.device}: images per second per member (median of {args.reps} "
          "interleaved rounds)")
    print(f"{'network':<10} {'batch':>5} {'ours':>9} {'torch.func':>11} {'loop':>9} {'plain':>9}  ours/loop  ours is")
    for name in args.networks.split(","):
        factory, shape, classes, batch, scale = NETWORKS[name]
        steps = max(2, int(args.steps * scale))
        step_of = paths(factory, shape, classes, args.device)
        kind = step_of.pop("ours is")
        xs = torch.randn(M, batch, *shape, generator=g).to(args.device)
        ys = torch.randint(0, classes, (M, batch), generator=g).to(args.device)
        seconds = {k: [] for k in step_of}
        for _ in range(args.reps):
            for k, step in step_of.items():
                seconds[k].append(measure(step, xs, ys, steps))
        rate = {k: batch * steps / statistics.median(v) for k, v in seconds.items()}
        row = {"batch": batch, "steps": steps, "ours_is": kind, "images_per_s_per_member": rate,
               "seconds": seconds, "ours_over_loop": rate["ours"] / rate["loop"]}
        if name == "mnist_cnn":  # augmentation's cost against the step it precedes
            augment = Compose(RandomCrop(4), RandomHorizontalFlip())
            seeds = [member_seed(0, m) for m in range(M)]
            synchronize(xs.device)
            start = time.perf_counter()
            for t in range(steps):
                augment_members(augment, xs, seeds, t)
            synchronize(xs.device)
            row["augment_s_per_step"] = (time.perf_counter() - start) / steps
            row["augment_share_of_step"] = row["augment_s_per_step"] / (statistics.median(seconds["ours"]) / steps)
        results["networks"][name] = row
        print(f"{name:<10} {batch:>5} {rate['ours']:>9.0f} {rate['torch.func']:>11.0f} {rate['loop']:>9.0f} "
              f"{rate['plain']:>9.0f}  {row['ours_over_loop']:>8.2f}x  {kind}")
    cnn = results["networks"].get("mnist_cnn")
    if cnn:
        print(f"augmentation (crop 4 + flip) on the MNIST CNN's batches: {1000 * cnn['augment_s_per_step']:.1f} ms per "
              f"step, {100 * cnn['augment_share_of_step']:.1f}% of the stacked step")
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    (RESULTS / f"member_throughput{suffix}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
