#!/usr/bin/env python
"""Online predictions: single-row requests against the Serve app, batched and unbatched, and a
naive server, from 1, 8 and 64 concurrent clients.

    python -m benchmarks.serve                 # about 3 minutes
    python -m benchmarks.serve --seconds 3     # a quicker look

The ensemble is UCI-sized (M = 5, 13 features, 50 hidden units, saved with feature names); each
request is one row keyed by feature name. The servers, in turn, on this machine's CPUs:
- `serve batched`: ensemble_app's defaults (max_batch_size 32, batch_wait_ms 2), one replica;
- `serve unbatched`: the same with max_batch_size 1;
- `naive`: a plain Starlette app under uvicorn in its own process, which loads the ensemble and
  runs it per request with the same parsing and response code (serving.parse_request and
  serving.response_rows), so the difference is Serve and batching, not the JSON.
The clients are aiohttp coroutines in this process, each sending its next request when the last
one is answered. Then the replica's own work per request is timed in-process, to say where the
time goes. Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from benchmarks.common import REPO, RESULTS

from ray_ensembles import DeepEnsemble
from ray_ensembles.serving import parse_request, predict_parts, response_rows

FEATURES = [f"x{i}" for i in range(13)]
CLIENTS = (1, 8, 64)


def saved_ensemble(folder: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(455, 13, generator=g, dtype=torch.float64) * 3 + 1
    ensemble = DeepEnsemble(13, 1, num_members=5, hidden_dim=50, seed=0)
    ensemble.fit_normalization(X, X[:, :1] * X[:, 1:2] + 2)
    ensemble.feature_names = FEATURES
    return ensemble.save(folder / "ensemble")


def bodies(count: int) -> list[bytes]:
    rows = np.random.default_rng(1).normal(1, 3, size=(count, 13))
    return [json.dumps({"rows": [dict(zip(FEATURES, row.tolist()))]}).encode() for row in rows]


async def load(url: str, clients: int, seconds: float, warmup_s: float = 1.0) -> dict:
    """Requests/s and latency percentiles of `clients` closed-loop clients over `seconds`."""
    import aiohttp

    payloads = bodies(256)
    latencies, failures, sent = [], 0, 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client(k: int, until: float, record: bool):
            nonlocal failures, sent
            i = k
            while time.perf_counter() < until:
                start, sent = time.perf_counter(), sent + 1
                async with session.post(url, data=payloads[i % len(payloads)],
                                        headers={"content-type": "application/json"}) as response:
                    await response.read()
                    ok = response.status == 200
                if record:
                    latencies.append(time.perf_counter() - start)
                    failures += not ok
                i += clients

        await asyncio.gather(*(client(k, time.perf_counter() + warmup_s, False) for k in range(clients)))
        start = time.perf_counter()
        await asyncio.gather(*(client(k, start + seconds, True) for k in range(clients)))
        wall = time.perf_counter() - start
    ms = 1e3 * np.asarray(latencies)
    return {"clients": clients, "requests": len(ms), "sent_with_warmup": sent, "failures": failures, "requests_per_s": len(ms) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline or (process and process.poll() is not None):
                raise
            time.sleep(0.2)


def naive_app(location: str):
    """The naive server: one forward pass per request, in the event loop, no batching."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from ray_ensembles.model.ensemble import load_ensemble

    ensemble = load_ensemble(location)

    async def predict(request):
        X, coverage = parse_request(json.loads(await request.body()), ensemble)
        return JSONResponse({"predictions": response_rows(ensemble.predict(torch.from_numpy(X)), coverage)})

    async def healthz(request):
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz)])


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process and its descendants (Ray's processes, the servers), by
    process title: where a request's time goes."""
    import psutil

    total: dict[str, float] = {}
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            name, times = process.name(), process.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        name = "client" if process.pid == os.getpid() else name.split(" ")[0]
        total[name] = total.get(name, 0.0) + times.user + times.system
    return total


def measure(url: str, seconds: float) -> list[dict]:
    rows = []
    for clients in CLIENTS:
        before = cpu_seconds()
        row = asyncio.run(load(url, clients, seconds))
        after = cpu_seconds()
        per_request = {name: 1e3 * (after[name] - before.get(name, 0.0)) / row["sent_with_warmup"] for name in after}
        row["cpu_ms_per_request"] = {k: round(v, 3) for k, v in sorted(per_request.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        print(row, flush=True)
        rows.append(row)
    return rows


def replica_work(location: str, reps: int = 2000) -> dict:
    """Milliseconds per request of what a replica does itself, timed in this process with one
    torch thread as a replica has: parsing, the forward pass (alone, and as 1/32 of a pass of 32
    rows), and the response rows."""
    from ray_ensembles.model.ensemble import load_ensemble

    torch.set_num_threads(1)
    ensemble = load_ensemble(location)
    body = json.loads(bodies(1)[0])
    X, coverage = parse_request(body, ensemble)
    pred = predict_parts(ensemble, [X])[0]

    def per_call_ms(function, count=reps):
        start = time.perf_counter()
        for _ in range(count):
            function()
        return 1e3 * (time.perf_counter() - start) / count

    return {"parse_ms": per_call_ms(lambda: parse_request(json.loads(json.dumps(body)), ensemble)),
            "forward_1_row_ms": per_call_ms(lambda: predict_parts(ensemble, [X])),
            "forward_per_row_in_32_ms": per_call_ms(lambda: predict_parts(ensemble, [X] * 32), reps // 32) / 32,
            "response_ms": per_call_ms(lambda: json.dumps(response_rows(pred, coverage)))}


INGRESS_ENV = {"proxy": {}, "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}


def run_naive(location: str, port: int, seconds: float) -> dict:
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.serve", "--naive-server", location,
                               "--port", str(port)], cwd=REPO)
    try:
        wait_ready(url + "/healthz", server)
        return {"naive": measure(url + "/predict", seconds)}
    finally:
        server.terminate()
        server.wait(30)


def run_serve(location: str, port: int, seconds: float, ingress: str) -> dict:
    """Serve's figures through its ingress (this process's environment chose it, before Ray and
    Serve read it), batched and unbatched, with the batched replica's counts."""
    import ray
    from ray import serve

    from ray_ensembles.serving import ensemble_app

    url, out = f"http://127.0.0.1:{port}", {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, batch in ((f"serve batched, {ingress}", 32), (f"serve unbatched, {ingress}", 1)):
            serve.run(ensemble_app(location, max_batch_size=batch), name="bench", route_prefix="/")
            wait_ready(url + "/healthz")
            out[name] = measure(url + "/predict", seconds)
            with urllib.request.urlopen(url + "/") as response:
                counts = json.loads(response.read())
            out[name + " counts"] = {k: counts[k] for k in ("requests", "forward_passes", "largest_batch")}
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per server and client count")
    p.add_argument("--port", type=int, default=8123)
    # the parts, each in a process of its own: Serve reads its ingress settings from the
    # environment once, at import
    p.add_argument("--naive-server", metavar="ENSEMBLE", help=argparse.SUPPRESS)
    p.add_argument("--part", nargs=2, metavar=("WHAT", "ENSEMBLE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.naive_server:
        import uvicorn

        uvicorn.run(naive_app(args.naive_server), host="127.0.0.1", port=args.port, log_level="warning")
        return
    if args.part:
        what, location = args.part
        out = run_naive(location, args.port, args.seconds) if what == "naive" else \
            run_serve(location, args.port, args.seconds, what)
        print("RESULT " + json.dumps(out), flush=True)
        return

    location = str(saved_ensemble(Path(tempfile.mkdtemp(prefix="serve-bench-"))))
    results = {"seconds": args.seconds, "servers": {}}
    for what in ("naive", "proxy", "haproxy"):
        print(what, flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--part", what, location,
                               "--seconds", str(args.seconds), "--port", str(args.port)], cwd=REPO,
                              env={**os.environ, **INGRESS_ENV.get(what, {})}, stdout=subprocess.PIPE,
                              text=True, check=True)
        line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
        results["servers"].update(json.loads(line[len("RESULT "):]))
    results["replica_work"] = replica_work(location)

    servers = results["servers"]
    by = {name: {row["clients"]: row for row in rows} for name, rows in servers.items() if not name.endswith("counts")}
    for ingress in INGRESS_ENV:
        batched, unbatched = by[f"serve batched, {ingress}"], by[f"serve unbatched, {ingress}"]
        results[f"{ingress}: batched over unbatched at 64"] = batched[64]["requests_per_s"] / unbatched[64]["requests_per_s"]
        results[f"{ingress}: batched over naive at 64"] = batched[64]["requests_per_s"] / by["naive"][64]["requests_per_s"]
        results[f"{ingress}: batched p99 ms at 8"] = batched[8]["p99_ms"]
    lines = ["| server | clients | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for name, rows in by.items():
        lines += [f"| {name} | {c} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |" for c, r in rows.items()]
    print("\n".join(lines))
    for ingress in INGRESS_ENV:
        counts = servers[f"serve batched, {ingress} counts"]
        print(f"{ingress}: at 64 clients batched Serve gives {results[f'{ingress}: batched over unbatched at 64']:.2f}x "
              f"the unbatched app's requests/s (goal >= 5x) and {results[f'{ingress}: batched over naive at 64']:.2f}x "
              f"the naive server's (goal > 1); p99 at 8 clients {results[f'{ingress}: batched p99 ms at 8']:.1f} ms "
              f"(goal < 50 ms); {counts['requests']} requests in {counts['forward_passes']} forward passes, "
              f"largest batch {counts['largest_batch']}")
    print("CPU ms per request at 64 clients, by process:")
    for name, rows in by.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[64]["cpu_ms_per_request"].items()))
    print("a replica's own work per request: " + ", ".join(f"{k[:-3]} {v:.3f} ms" for k, v in results["replica_work"].items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
