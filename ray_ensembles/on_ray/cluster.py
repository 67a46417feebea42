"""The Ray cluster as this package sees it: joining it (or starting a local one) and what it holds."""

from __future__ import annotations

import os

AUTOSCALING_ENV = "RAY_ENSEMBLES_AUTOSCALING"  # "1": the cluster grows on demand, skip the size checks


def join_ray():
    """Join RAY_ADDRESS or a running cluster, else start a local Ray, unless already connected."""
    import ray

    if not ray.is_initialized():
        ray.init()


def capacity() -> dict[str, float]:
    """What the cluster holds (CPU, GPU, memory, ...), joining it first."""
    import ray

    join_ray()
    return ray.cluster_resources()


def autoscaling() -> bool:
    """Whether the user says the cluster grows on demand: requests larger than it are then left to wait."""
    return os.environ.get(AUTOSCALING_ENV) == "1"
