#!/usr/bin/env python
"""Serve a saved ensemble (or a folder of them) over HTTP with Ray Serve, until Ctrl-C.

    python jobs/serve.py --ensemble outputs/train_ensemble/ensemble            # 127.0.0.1:8000
    python jobs/serve.py --ensemble s3://b/runs/r1/ensemble --replicas 4 --use-gpu
    curl -s localhost:8000/predict -d '{"rows": [{"x": 1.5}, {"x": -2.0}], "coverage": 0.9}'

Routes and the response: ray_ensembles/serving.py. The proxy listens on 127.0.0.1 unless --host
says otherwise (behind a cluster's ingress: README, "Online predictions").
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading

from common import add_console_arguments, as_option, fail, import_callable, say, start_ray


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ensemble", required=True, help="a saved ensemble, or a folder of them: local or URI")
    p.add_argument("--host", default="127.0.0.1", help="the HTTP proxy's address (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--route-prefix", default="/")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per replica")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests per forward pass (1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long a batch waits to fill")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-ensembles-per-replica", type=int, default=3, help="a folder's ensembles kept loaded")
    p.add_argument("--member-factory", default=None, metavar="MODULE:FUNCTION",
                   help="the callable that built the members of ensembles trained with one")
    add_console_arguments(p, tracking=False, results=False)
    return p.parse_args(argv)


def check_port(host: str, port: int):
    """The proxy could bind here: a port in use would leave Serve retrying instead of failing."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise ValueError(f"The '--host' and '--port' options must name an address this machine can "
                         f"listen on. Got {host}:{port} instead ({err.strerror or err}).") from None


def main(argv=None):
    args = parse_args(argv)
    try:
        if not 0 < args.port < 65536:
            raise ValueError(f"The '--port' option must be in 1..65535. Got {args.port} instead.")
        if not args.route_prefix.startswith("/"):
            raise ValueError(f"The '--route-prefix' option must start with '/'. Got {args.route_prefix!r} instead.")
        check_port(args.host, args.port)
        from ray_ensembles.serving import ensemble_app

        factory = import_callable(args.member_factory, "--member-factory") if args.member_factory else None
        app = ensemble_app(args.ensemble, member_factory=factory, num_replicas=args.replicas, use_gpu=args.use_gpu,
                           cpus_per_replica=args.cpus_per_replica, max_batch_size=args.max_batch_size,
                           batch_wait_ms=args.batch_wait_ms, max_body_bytes=args.max_body_bytes,
                           max_ensembles_per_replica=args.max_ensembles_per_replica)
    except (TypeError, ValueError) as err:
        fail(as_option(str(err), "ensemble_app", {"num_replicas": "--replicas"}))
    except OSError as err:  # a store that fails
        fail(str(err), status=1)

    import ray
    from ray import serve

    from ray_ensembles.on_ray.ray_internals import delete_serve_app

    say(args, start_ray(args))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="ray_ensembles", route_prefix=args.route_prefix)
        url = f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"
        say(args, f"Serving {args.ensemble} at {url}/ ({args.replicas} replica{'s' * (args.replicas != 1)}): "
                  f"POST {url}/predict, GET {url}/ and {url}/healthz. Ctrl-C stops.")
        stop.wait()
    finally:
        # The app, not Serve: on a cluster Serve may hold other apps, and a local Ray goes whole
        # with ray.shutdown(). Waiting for the deletion (or serve.shutdown()) took 30 s behind HAProxy.
        delete_serve_app("ray_ensembles")
        ray.shutdown()


if __name__ == "__main__":
    main()
