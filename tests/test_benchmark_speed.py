"""benchmarks/benchmark_speed.py --smoke-test: every implementation runs, and they compute the same thing."""

import json

from benchmarks import benchmark_speed as bench
import pytest

pytestmark = pytest.mark.unit


def test_smoke_run_times_every_implementation_and_checks_they_agree(tmp_path):
    bench.main(["--smoke-test", "--output", str(tmp_path)])
    result = json.loads((tmp_path / "speed.json").read_text())
    impls = {(r["impl"], r["fgsm"]) for r in result["rows"]}
    assert impls == {(i, f) for i in ("ours", "ours-amp", "loop", "vmap", "peer") for f in (False, True)}
    assert all(r["median_ms"] > 0 and r["gflops"] > 0 for r in result["rows"])
    assert all(gap < 1e-5 for gap in result["loss_gaps"].values())  # same init and batches, same losses
    assert result["peak_gflops"]["1 thread"] > 1
