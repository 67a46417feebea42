"""Kills one Ray Train worker process once, right after a checkpoint report: the tests' fault,
kept out of the library. `install` is a Ray `worker_process_setup_hook`; it arms only when the
file named by FAULT_FILE_ENV exists, holding {"rank", "after_step", "marker"}, and the marker
file it then touches says the worker really died."""

import json
import os
import time
from pathlib import Path

FAULT_FILE_ENV = "RAY_ENSEMBLES_TEST_FAULT_FILE"


def install():
    fault_file = os.environ.get(FAULT_FILE_ENV)
    if not fault_file:
        return
    import ray.train

    report = ray.train.report

    def report_then_crash(metrics, *args, **kwargs):
        report(metrics, *args, **kwargs)
        if not os.path.exists(fault_file):
            return
        fault = json.loads(Path(fault_file).read_text())
        if ray.train.get_context().get_world_rank() == fault["rank"] and metrics.get("step", 0) >= fault["after_step"] \
                and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).touch()
            time.sleep(1.5)  # let the controller commit the checkpoint first
            os._exit(1)

    ray.train.report = report_then_crash
