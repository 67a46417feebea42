#!/usr/bin/env python
"""What the live progress bar costs a Ray worker's training step.

    python -m benchmarks.benchmark_progress               # the toy problem's step (the smallest: the worst case)
    python -m benchmarks.benchmark_progress --smoke-test  # seconds, for CI

A worker's `on_step` (`distributed.progress_sender`) reads the clock every step and sends its
progress to the driver's channel (the GCS's key-value store) every REPORT_EVERY_S. This runs the
same training loop in one process against a real channel on a local Ray, interleaved: without the hook, and with
it. It also times the hook's two parts on their own, which the whole-run difference (noisy on a
shared VM) can be checked against: one clock check per step, and one message per interval.
Writes benchmarks/results/progress_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ray
import torch

from ray_ensembles import DeepEnsemble
from ray_ensembles.loop.data import cubic_toy
from ray_ensembles.on_ray.reporting import RunChannel, progress_sender
from ray_ensembles.loop.progress import REPORT_EVERY_S, Every
from ray_ensembles.loop.training import EnsembleFit, TrainSettings

RESULTS = Path(__file__).resolve().parent / "results" / "progress_cost.json"


def fit_seconds(steps: int, on_step) -> float:
    """Seconds per step of the toy job's training (M = 5, 1 x 100, batch 20 of 20 rows)."""
    torch.manual_seed(0)
    data = cubic_toy(20, 0)
    ensemble = DeepEnsemble(1, num_members=5, hidden_dim=100)
    ensemble.fit_normalization(data.X, data.y)
    fit = EnsembleFit(ensemble, data, TrainSettings(batch_size=20, lr=0.01, num_steps=steps),
                      "cpu")
    start = time.perf_counter()
    fit.run(on_step=on_step)
    return (time.perf_counter() - start) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--smoke-test", action="store_true")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.steps, args.repeats = 500, 1
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_config=ray.LoggingConfig(log_level="WARNING"))
    channel = RunChannel()

    plain, hooked = [], []
    for i in range(args.repeats):  # interleaved, in alternating order: the VM's slow and fast phases hit both alike
        for hook in ([False, True] if i % 2 == 0 else [True, False]):
            if hook:
                hooked.append(fit_seconds(args.steps, progress_sender(channel, 0, args.steps)))
            else:
                plain.append(fit_seconds(args.steps, None))
    step = statistics.median(plain)

    tick, n = Every(REPORT_EVERY_S), 1_000_000
    start = time.perf_counter()
    for _ in range(n):
        tick()
    clock_s = (time.perf_counter() - start) / n
    losses = [0.1] * 5
    start = time.perf_counter()
    for _ in range(200):
        channel.progress(0, 1, 5, losses)
    message_s = (time.perf_counter() - start) / 200
    channel.close()
    parts_s = clock_s + message_s * step / REPORT_EVERY_S  # per step: a clock read, a share of a message
    ray.shutdown()

    result = {"steps": args.steps, "repeats": args.repeats, "step_s_without": plain, "step_s_with": hooked,
              "median_step_us": step * 1e6, "median_step_with_hook_us": statistics.median(hooked) * 1e6,
              "whole_run_overhead_pct": 100 * (statistics.median(hooked) / step - 1),
              "clock_check_us": clock_s * 1e6, "message_us": message_s * 1e6,
              "report_every_s": REPORT_EVERY_S, "hook_per_step_us": parts_s * 1e6,
              "hook_pct_of_step": 100 * parts_s / step}
    print(f"{'':<36}{'us per step':>14}")
    print(f"{'training step, no hook (median)':<36}{result['median_step_us']:>14.1f}")
    print(f"{'training step, with the hook':<36}{result['median_step_with_hook_us']:>14.1f}"
          f"   ({result['whole_run_overhead_pct']:+.2f}%, whole runs, {args.repeats} each, interleaved)")
    print(f"{'clock check (every step)':<36}{clock_s * 1e6:>14.3f}")
    print(f"{'one message to the channel':<36}{message_s * 1e6:>14.1f}   (once every {REPORT_EVERY_S:g} s)")
    print(f"{'the hook, per step':<36}{parts_s * 1e6:>14.3f}   ({result['hook_pct_of_step']:.3f}% of the step)")
    if not args.smoke_test:
        RESULTS.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
