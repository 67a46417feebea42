"""Ports for the servers the tests start and must name in advance (a Ray head, S3, Serve).

A port found by binding port 0 is an ephemeral one: once released, the kernel may hand it to any
outbound connection before the server binds it (a two-node cluster once failed to start so).
Ports below the ephemeral range are never handed out that way, so a free one stays free until
the server binds it, unless another process asks for that very port."""

import random
import socket
from pathlib import Path

_given: set[int] = set()  # never the same port twice in one process


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port below the ephemeral range that nothing listens on now."""
    candidates = list(range(20000, _ephemeral_start()))
    random.shuffle(candidates)
    for port in candidates:
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")
