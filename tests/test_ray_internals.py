"""The Ray names ray_internals uses that Ray does not make public: a Ray release that moves them
fails here, by name, not somewhere inside a fit."""

import inspect
import logging

import pytest
from ray.train import ScalingConfig

from ray_ensembles.on_ray.distributed import resources_per_worker
from ray_ensembles.on_ray.ray_internals import data_parallel_trainer, quiet_worker_reports

pytestmark = pytest.mark.unit


def test_the_data_parallel_trainer_takes_what_the_shim_passes():
    parameters = inspect.signature(data_parallel_trainer()).parameters
    assert {"train_loop_per_worker", "train_loop_config", "backend_config", "scaling_config",
            "run_config", "datasets", "dataset_config"} <= set(parameters)


def test_the_report_logger_is_named_by_its_file_and_gets_the_runs_level():
    from ray.train.v2._internal.execution import context
    assert context.logger is logging.getLogger(context.__file__)
    before = context.logger.level
    try:
        quiet_worker_reports("WARNING")
        assert not context.logger.isEnabledFor(logging.INFO)
    finally:
        context.logger.setLevel(before)


@pytest.mark.parametrize("config", [
    ScalingConfig(num_workers=2), ScalingConfig(num_workers=2, use_gpu=True),
    ScalingConfig(num_workers=3, resources_per_worker={"CPU": 0.5}),
    ScalingConfig(num_workers=1, use_gpu=True, resources_per_worker={"CPU": 2, "GPU": 0.5}),
    ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1, "memory": 0}),
])
def test_the_resources_per_worker_are_ray_trains_own(config):
    assert resources_per_worker(config) == config._resources_per_worker_not_none  # Ray's reckoning


def test_the_gcs_key_value_store_the_run_channel_uses_is_where_the_shim_looks():
    from ray.experimental import internal_kv

    from ray_ensembles.on_ray.ray_internals import kv_delete_prefix, kv_get, kv_keys, kv_put
    for name in ("_internal_kv_put", "_internal_kv_get", "_internal_kv_list", "_internal_kv_del"):
        assert callable(getattr(internal_kv, name))
    assert {"overwrite", "namespace"} <= set(inspect.signature(internal_kv._internal_kv_put).parameters)
    assert "del_by_prefix" in inspect.signature(internal_kv._internal_kv_del).parameters
    assert all(callable(f) for f in (kv_put, kv_get, kv_keys, kv_delete_prefix))


def test_serve_deletes_an_app_without_waiting_when_asked():
    from ray import serve
    assert "_blocking" in inspect.signature(serve.delete).parameters
