"""cluster.yaml against the cluster-launcher schema that ships inside the ray package."""

import copy

import pytest
import yaml
from jsonschema.exceptions import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO

pytestmark = pytest.mark.unit

CONFIG = yaml.safe_load((REPO / "cluster.yaml").read_text())


def validate(config):
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_is_a_valid_launcher_config():
    validate(CONFIG)
    gpu = CONFIG["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1 and gpu["min_workers"] == 0 < gpu["max_workers"]
    assert "GPU" not in CONFIG["available_node_types"][CONFIG["head_node_type"]]["resources"]


def test_cluster_yaml_installs_this_package_keeps_auth_and_a_local_dashboard():
    assert any("pip install -e ~/ray_ensembles" in c for c in CONFIG["setup_commands"])
    head = " ".join(CONFIG["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_ENSEMBLES_AUTOSCALING=1" in head
    assert "RAY_AUTH_MODE=disabled" not in (REPO / "cluster.yaml").read_text()


@pytest.mark.parametrize("mutate, error, message", [
    (lambda c: c["available_node_types"]["head"].update(resourcez={}), ValidationError, "'resourcez' was unexpected"),
    (lambda c: c.update(head_node_type="missing"), ValueError, "head_node_type"),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), ValidationError,
     "0.5 is not of type 'integer'"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), ValidationError,
     "'node_config' is a required property"),
], ids=["typo", "undefined head", "fractional GPU", "no node_config"])
def test_the_validation_catches_broken_configs(mutate, error, message):
    broken = copy.deepcopy(CONFIG)
    mutate(broken)
    with pytest.raises(error, match=message):
        validate(broken)
