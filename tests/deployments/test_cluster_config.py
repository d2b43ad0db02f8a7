"""cluster.yaml and the app configs are checked with Ray's and our own validation (no cloud, no cluster)."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from deployments.app import AppConfigError, build_app, parse_app_config

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / name).read_text())


def test_cluster_yaml_passes_ray_validation():
    config = _load("cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert any("make install" in cmd for cmd in config["setup_commands"])


def test_cluster_yaml_validation_catches_a_typo():
    config = _load("cluster.yaml")
    config["available_node_types"]["head_cpu"]["min_worker"] = 0  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_serve_configs_are_valid(name):
    config = _load(name)
    ServeDeploySchema.model_validate(config)  # Serve's own schema of `serve deploy` files
    app = config["applications"][0]
    assert app["import_path"] == "deployments.app:build_app"
    parsed = parse_app_config(app["args"])
    if name == "serve_config.yaml":
        assert parsed.engine.num_replicas == 2 and parsed.engine.num_cpus == 0
        assert parsed.device == "cpu"
    build_app(app["args"])  # builds the deployment graph (no cluster needed)


@pytest.mark.parametrize(
    "args,field",
    [
        ({"engine": {"num_replicas": 0}}, "engine"),
        ({"engine": {"router": "fastest"}}, "engine.router"),
        ({"engine": {"max_ongoing_requests": 0}}, "engine.max_ongoing_requests"),
        ({"ingress": {"overload_status_code": 500}}, "ingress.overload_status_code"),
        ({"modle": "smollm2"}, "modle"),
        ({"engine_kwargs": {"max_batch_size": 0}}, "max_batch_size"),
        ({"engine_kwargs": {"max_batch_sise": 4}}, "max_batch_sise"),
    ],
)
def test_bad_app_config_names_the_field(args, field):
    with pytest.raises(AppConfigError, match=field.replace(".", r"\.")):
        build_app(args)


def test_every_config_field_is_described():
    from deployments.config import AppConfig, EngineDeploymentConfig, IngressConfig

    for model in (AppConfig, EngineDeploymentConfig, IngressConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
