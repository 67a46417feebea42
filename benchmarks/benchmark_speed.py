#!/usr/bin/env python
"""Training-step speed against the peers and the machine's matmul peak, in ONE process.

    python -m benchmarks.benchmark_speed               # UCI, protein and MNIST sizes, M = 5, +/- FGSM
    python -m benchmarks.benchmark_speed --smoke-test  # seconds, for CI
    python -m benchmarks.benchmark_speed --device cuda # the same table on a GPU

Implementations, each taking one optimiser step for M members on batches of 100:
  ours      ray_ensembles' training step (EnsembleFit.train_step: stacked members, one fused Adam)
  ours-amp  the same with bfloat16 autocast (Trainer(amp=True))
  peer      deep-ensembles-pytorch 0.1.2's Trainer step (autocast, backward, clip, Adam, EMA)
  loop      a naive loop over M nn.Modules with M Adam optimisers
  vmap      torch.func.stack_module_state + functional_call + vmap, one Adam over the stack
On a GPU, ours replays each step's forward and backward from a CUDA graph (the default), and also:
  ours-eager   ours with cuda_graphs=False: every kernel launched from Python
  peer-amp     the peer with its amp=True (float16 autocast and a gradient scaler)
They run interleaved (A B C D A B C D ...) after a warm-up; the table has the median and the
min-max time per step, samples x members per second, the ratio to ours, and the achieved GFLOP/s
as a fraction of this machine's float32 matmul peak, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benchmarks.common import fail, unstacked

from ray_ensembles import DeepEnsemble, TensorDataset
from ray_ensembles.loop.training import EnsembleFit, TrainSettings

# name: (dim_in, hidden layers, dim_out of the Gaussian head, training rows)
SHAPES = {"uci": (13, [50], 1, 455), "protein": (9, [100], 1, 40_000), "mnist": (784, [200, 200, 200], 5, 60_000)}
M, BATCH = 5, 100


def matmul_peak(threads: int, n: int = 1024, reps: int = 10, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a large matmul with `threads` threads (best of reps)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = math.inf
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(old)
    return 2 * n ** 3 / best / 1e9


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_flops(dims: list[int], adversarial: bool) -> float:
    """Matmul FLOPs of one step for all members: forward 2, backward 4 per multiply-add (x3),
    FGSM about 7 forward passes' worth instead of 3."""
    macs = sum(i * o for i, o in zip(dims[:-1], dims[1:]))
    return 2 * macs * BATCH * M * (7 if adversarial else 3)


def gaussian_nll(out):
    mean, raw = out.chunk(2, dim=-1)
    var = F.softplus(raw) + 1e-6
    return mean, var


class Ours:
    name = "ours"
    amp = False
    graphs = True

    def __init__(self, dims, adversarial, X, y, device="cpu"):
        self.ensemble = DeepEnsemble(dims[0], dims[-1] // 2, num_members=M, hidden_dim=dims[1], depth=len(dims) - 2,
                                     use_adversarial_training=adversarial, seed=0,
                                     nll_beta=0.0)  # the plain NLL, as the implementations it is timed against
        self.ensemble.fit_normalization(X, y)
        settings = TrainSettings(batch_size=BATCH, num_steps=10 ** 9, amp=self.amp, cuda_graphs=self.graphs)
        self.fit = EnsembleFit(self.ensemble, TensorDataset(X, y), settings, device)

    def step(self):
        return self.fit.train_step()


class OursAMP(Ours):
    """The same step with bfloat16 autocast (`amp=True`). The peer has no faster mode on a CPU:
    its `amp=True` asks accelerate for float16, which runs float32 without a GPU."""
    name = "ours-amp"
    amp = True


class OursEager(Ours):
    """ours without CUDA graphs (`Trainer(cuda_graphs=False)`): every kernel launched from Python."""
    name = "ours-eager"
    graphs = False


class Loop:
    """M separate modules, M optimisers, each member on its own batch (same rows as ours)."""
    name = "loop"

    def __init__(self, dims, adversarial, X, y, source: Ours):
        self.adversarial, self.source = adversarial, source
        self.nets = [net.to(source.fit.batches.xs.device) for net in unstacked(source.ensemble, dims)]  # ours' initial weights
        self.opts = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in self.nets]
        self.eps = source.ensemble.adversarial_step
        self.steps = 0

    def member_loss(self, net, x, y):
        mean, var = gaussian_nll(net(x))
        return (0.5 * (math.log(2 * math.pi) + var.log() + (y - mean) ** 2 / var)).sum(-1).mean()

    def next_rows(self) -> torch.Tensor:
        """(M, b) row indices: the same rows ours uses at this implementation's step."""
        self.steps += 1
        return self.source.fit.batches.rows(self.steps - 1)

    def step(self):
        fit, index = self.source.fit, self.next_rows()
        losses = []
        for m, (net, opt) in enumerate(zip(self.nets, self.opts)):
            x, y = fit.batches.xs[index[m]], fit.batches.ys[index[m]]
            if self.adversarial:
                x = x.clone().requires_grad_(True)
                clean = self.member_loss(net, x, y)
                (g,) = torch.autograd.grad(clean, x, retain_graph=True)
                loss = clean + self.member_loss(net, (x + self.eps * g.sign()).detach(), y)
            else:
                loss = self.member_loss(net, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)


class VMap(Loop):
    """The same modules stacked with torch.func and run under vmap, one Adam over the stack."""
    name = "vmap"

    def __init__(self, dims, adversarial, X, y, source):
        super().__init__(dims, adversarial, X, y, source)
        from torch.func import functional_call, stack_module_state, vmap
        self.params, self.buffers = stack_module_state(self.nets)
        self.params = {k: v.detach().requires_grad_() for k, v in self.params.items()}
        base = self.nets[0]

        def one(params, buffers, x, y):
            mean, var = gaussian_nll(functional_call(base, (params, buffers), (x,)))
            return (0.5 * (math.log(2 * math.pi) + var.log() + (y - mean) ** 2 / var)).sum(-1).mean()

        self.losses = vmap(one)
        self.opt = torch.optim.Adam(self.params.values(), lr=1e-3, foreach=True)

    def step(self):
        fit, index = self.source.fit, self.next_rows()
        x, y = fit.batches.xs[index], fit.batches.ys[index]
        if self.adversarial:
            x = x.clone().requires_grad_(True)
            clean = self.losses(self.params, self.buffers, x, y)
            (g,) = torch.autograd.grad(clean.sum(), x, retain_graph=True)
            losses = clean + self.losses(self.params, self.buffers, (x + self.eps * g.sign()).detach(), y)
        else:
            losses = self.losses(self.params, self.buffers, x, y)
        self.opt.zero_grad()
        losses.sum().backward()
        self.opt.step()
        return losses.detach()


class Peer:
    """deep-ensembles-pytorch's Trainer step. Its member: Linear layers with RMSNorm + SiLU and
    separate mean / variance heads; depth chosen so that the matmul shapes equal ours. All its
    members see the same batch, and its FGSM leaks into the weight gradients (its defects)."""
    name = "peer"
    amp = False

    def __init__(self, dims, adversarial, X, y, device="cpu"):
        from deep_ensembles_pytorch import DeepEnsemble as PeerEnsemble
        from deep_ensembles_pytorch import TensorDataset as PeerData
        from deep_ensembles_pytorch import Trainer as PeerTrainer
        from accelerate.state import AcceleratorState, PartialState
        self.ensemble = PeerEnsemble(dims[0], dims[-1] // 2, num_members=M, hidden_dim=dims[1],
                                     depth=len(dims) - 1, use_adversarial_training=adversarial)
        # a fresh accelerate state on our device: the peer's own Accelerator() takes that device
        # (else any GPU it sees) and sets its own precision
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState(cpu=torch.device(device).type == "cpu")
        self.trainer = PeerTrainer(self.ensemble, PeerData(X, y), train_batch_size=BATCH, amp=self.amp,
                                   train_num_steps=10 ** 9, results_folder="/tmp/peer-results")
        self.batches = iter(self.trainer.dl)

    def step(self):
        t = self.trainer
        try:
            x, y = next(self.batches)
        except StopIteration:
            self.batches = iter(t.dl)
            x, y = next(self.batches)
        with t.accelerator.autocast():
            loss = t.ensemble(x, y)
        t.accelerator.backward(loss)
        t.accelerator.clip_grad_norm_(t.ensemble.parameters(), 1.0)
        t.opt.step()
        t.opt.zero_grad()
        t.ema.update()
        return loss.detach()


class PeerAMP(Peer):
    """The peer's amp=True: float16 autocast with a gradient scaler (on a GPU; on a CPU it runs
    float32, so the CPU table leaves it out)."""
    name = "peer-amp"
    amp = True


def check_same_losses(dims, adversarial, X, y, device, steps=20) -> float:
    """Same init and batches: ours, the loop, vmap (and on a GPU ours without CUDA graphs) agree
    to float rounding (max relative gap)."""
    ours = Ours(dims, adversarial, X, y, device)
    others = [Loop(dims, adversarial, X, y, ours), VMap(dims, adversarial, X, y, ours)]
    if torch.device(device).type == "cuda":
        others.append(OursEager(dims, adversarial, X, y, device))
    gap = 0.0
    for _ in range(steps):
        reference = ours.step()
        for impl in others:
            gap = max(gap, ((impl.step() - reference).abs() / reference.abs().clamp_min(1e-6)).max().item())
    return gap


def benchmark(shape, adversarial, reps, steps, include_peer, device="cpu"):
    dim_in, hidden, dim_out, rows = SHAPES[shape]
    dims = [dim_in, *hidden, 2 * dim_out]
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(rows, dim_in, generator=g), torch.randn(rows, dim_out, generator=g)
    ours = Ours(dims, adversarial, X, y, device)
    impls = [ours, OursAMP(dims, adversarial, X, y, device), Loop(dims, adversarial, X, y, ours),
             VMap(dims, adversarial, X, y, ours)]
    if include_peer:
        impls.append(Peer(dims, adversarial, X, y, device))
    if torch.device(device).type == "cuda":
        impls.append(OursEager(dims, adversarial, X, y, device))
        if include_peer:
            impls.append(PeerAMP(dims, adversarial, X, y, device))
    times = {impl.name: [] for impl in impls}
    for impl in impls:  # warm-up (long enough for the CUDA graphs' captures)
        for _ in range(max(steps, 3)):
            impl.step()
    for _ in range(reps):
        for impl in impls:  # interleaved, so drifts in machine load hit every implementation alike
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                impl.step()
            sync(device)
            times[impl.name].append((time.perf_counter() - start) / steps)
    flops = step_flops(dims, adversarial)
    reference = statistics.median(times["ours"])
    return [{"shape": shape, "fgsm": adversarial, "impl": name, "median_ms": 1e3 * statistics.median(ts),
             "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts),
             "samples_x_members_per_s": BATCH * M / statistics.median(ts),
             "speedup_of_ours": statistics.median(ts) / reference,
             "gflops": flops / statistics.median(ts) / 1e9} for name, ts in times.items()], \
        check_same_losses(dims, adversarial, X, y, device)


def profile_step(impl, steps: int = 50) -> dict:
    """Where a GPU step's time goes: kernels launched, their summed GPU time, and the wall time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(20):  # past the CUDA graphs' captures
        impl.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            impl.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"impl": impl.name, "kernels_per_step": len(kernels) / steps,
            "kernel_us_per_step": sum(e.time_range.elapsed_us() for e in kernels) / steps,
            "wall_us_per_step_profiled": 1e6 * wall / steps}


def inference(rows: int, reps: int, device="cpu") -> dict:
    """Predictive mean and variance for `rows` rows at M=5 (UCI size): ours vs a per-member loop."""
    X = torch.randn(rows, 13, device=device)
    e = DeepEnsemble(13, 1, num_members=M, hidden_dim=50, seed=0).eval()
    nets = [net.to(device) for net in unstacked(e, [13, 50, 2])]
    e.to(device)

    @torch.no_grad()
    def naive():
        means, variances = [], []
        for net in nets:
            mean, var = gaussian_nll(net(X))
            means.append(mean)
            variances.append(var)
        means, variances = torch.stack(means), torch.stack(variances)
        return means.mean(0), (variances + means ** 2).mean(0) - means.mean(0) ** 2

    def ours():
        pred = e.predict(X)
        return pred.mean, pred.variance

    torch.testing.assert_close(ours()[0], naive()[0], rtol=1e-4, atol=1e-4)
    times = {"ours": [], "loop": []}
    for _ in range(reps):
        for name, fn in (("ours", ours), ("loop", naive)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ray_overhead(output: Path) -> dict:
    """A 5-member UCI-sized fit (455 rows, 40 epochs) in-process vs on 2 Ray workers, with the
    breakdown of the Ray run; and MNIST-sized members on 1 vs 2 workers with 1 thread each."""
    import ray
    from ray.train import ScalingConfig
    from ray_ensembles import Trainer

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(455, 13, generator=g), torch.randn(455, 1, generator=g)
    options = dict(train_batch_size=BATCH, train_num_epochs=40, save_every=10 ** 9)
    start = time.perf_counter()
    Trainer(DeepEnsemble(13, 1, num_members=M, seed=0), TensorDataset(X, y), results_folder=output / "fit", **options).train()
    in_process = time.perf_counter() - start
    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    start = time.perf_counter()
    trainer = Trainer(DeepEnsemble(13, 1, num_members=M, seed=0), TensorDataset(X, y), results_folder=output / "fit",
                      scaling_config=ScalingConfig(num_workers=2), **options)
    trainer.train()
    on_ray = time.perf_counter() - start
    result = {"in_process_s": in_process, "ray_start_s": ray_start, "ray_fit_s": on_ray,
              "extra_s": ray_start + on_ray - in_process, **trainer.timings}

    images = torch.randn(6000, 784, generator=g)
    labels = torch.randint(0, 10, (6000,), generator=g)
    from ray_ensembles import DeepEnsembleClassifier
    for workers in (1, 2):
        clf = DeepEnsembleClassifier(784, 10, num_members=4, hidden_dim=200, depth=3, seed=0)
        t = Trainer(clf, TensorDataset(images, labels), train_batch_size=BATCH, train_num_epochs=20, save_every=10 ** 9,
                    results_folder=output / "fit", scaling_config=ScalingConfig(num_workers=workers,
                                                                                resources_per_worker={"CPU": 1}))
        t.train()
        result[f"mnist_training_s_{workers}_workers"] = t.timings["training_s"]
    ray.shutdown()
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="uci,protein,mnist")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--steps", type=int, default=20, help="steps per timed repetition")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--output", default="outputs/benchmark_speed")
    p.add_argument("--smoke-test", action="store_true")
    p.add_argument("--ray", action="store_true", help="only the Ray overhead and 2-worker scaling")
    args = p.parse_args(argv)
    if args.ray:
        result = ray_overhead(Path(args.output))
        print(json.dumps(result, indent=2))
        Path(args.output).mkdir(parents=True, exist_ok=True)
        (Path(args.output) / "ray_overhead.json").write_text(json.dumps(result, indent=2))
        return
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        fail("The '--device' option is 'cuda', but torch sees no GPU.")
    if args.smoke_test:
        args.reps, args.steps, args.shapes = 2, 2, "uci"
    torch.set_num_threads(args.threads)
    try:
        import deep_ensembles_pytorch  # noqa: F401
        include_peer = True
    except ImportError:
        include_peer = False
        print("deep-ensembles-pytorch is not installed (pip install -e '.[test]'): skipping the peer")

    if gpu:
        peak = {"float32": matmul_peak(1, 8192, device="cuda"),
                "bfloat16": matmul_peak(1, 8192, device="cuda", dtype=torch.bfloat16)}
        reference, machine = "float32", torch.cuda.get_device_name()
    else:
        peak = {"1 thread": matmul_peak(1), f"{torch.get_num_threads()} threads": matmul_peak(torch.get_num_threads()),
                "all threads": matmul_peak(max(1, torch.get_num_threads() if args.smoke_test else 2))}
        reference, machine = "1 thread", f"{platform.processor() or platform.machine()}, {args.threads} thread(s)"
    rows, gaps = [], {}
    for shape in args.shapes.split(","):
        for adversarial in (False, True):
            result, gap = benchmark(shape, adversarial, args.reps, args.steps, include_peer, args.device)
            rows += result
            gaps[f"{shape}{' +FGSM' if adversarial else ''}"] = gap
    inference_rows = 10_000 if args.smoke_test else 1_000_000
    predict = inference(inference_rows, 2 if args.smoke_test else 5, args.device)
    profiles = []
    if gpu:
        dims, X, y = [13, 50, 2], torch.randn(455, 13), torch.randn(455, 1)
        profiles = [profile_step(cls(dims, False, X, y, "cuda")) for cls in (OursEager, Ours)]

    print(f"torch {torch.__version__}, {machine}; matmul peak: "
          + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peak.items()))
    print(f"\n| shape | FGSM | impl | ms/step (median, min-max) | samples x members / s | time vs ours | GFLOP/s | % of {reference} peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {'yes' if r['fgsm'] else 'no'} | {r['impl']} | {r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | "
              f"{r['samples_x_members_per_s']:,.0f} | {r['speedup_of_ours']:.2f}x | {r['gflops']:.1f} | "
              f"{100 * r['gflops'] / peak[reference]:.2f}% |")
    print(f"\nSame init and batches, 20 steps: largest relative loss gap to ours of loop, vmap{' and ours-eager' if gpu else ''}: " +
          ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))
    print(f"Inference, {inference_rows:,} rows, M={M}: ours {predict['ours']:.4f} s, "
          f"per-member loop {predict['loop']:.4f} s ({predict['loop'] / predict['ours']:.1f}x)")
    for prof in profiles:
        print(f"Profile, UCI size, {prof['impl']}: {prof['kernels_per_step']:.0f} kernels per step, "
              f"{prof['kernel_us_per_step']:.0f} us of them on the GPU, {prof['wall_us_per_step_profiled']:.0f} us wall")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "speed.json").write_text(json.dumps({"torch": torch.__version__, "machine": machine, "threads": args.threads,
                                                   "device": args.device, "peak_gflops": peak, "rows": rows,
                                                   "loss_gaps": gaps, "inference_s": predict,
                                                   "profiles": profiles}, indent=2))


if __name__ == "__main__":
    main()
