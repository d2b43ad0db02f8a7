"""cluster.yaml and the app configs are checked with Ray's and our own validation (no cloud, no cluster)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from deployments.app import AppConfigError, build_app, parse_app_config
from deployments.serve_mode import SERVE_ENV
from engine.weights.resolve import _CONFIGS_DIR, DUMMY_TOKENIZER_DIR
from tests.engine.tiny_checkpoints import lay_out_hub_cache, save_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding what the deploying process fetches of Meta-Llama-3-8B-Instruct (its
    config, a tokenizer and a safetensors index, no weights), as it would after `serve deploy` on a real cluster."""
    from huggingface_hub import constants

    files = tmp_path / "llama-3-8b-metadata"
    files.mkdir()
    shutil.copy(_CONFIGS_DIR / "llama-3-8b.json", files / "config.json")
    for f in DUMMY_TOKENIZER_DIR.iterdir():
        shutil.copy(f, files / f.name)
    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = {"metadata": {}, "weight_map": {f"model.layers.{i}.mlp.up_proj.weight": s for i, s in enumerate(shards)}}
    (files / "model.safetensors.index.json").write_text(json.dumps(index))
    cache = tmp_path / "hf-cache"
    lay_out_hub_cache(cache, "meta-llama/Meta-Llama-3-8B-Instruct", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _load(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / name).read_text())


def test_cluster_yaml_passes_ray_validation():
    config = _load("cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert any("make install" in cmd for cmd in config["setup_commands"])


def test_every_ray_start_puts_serve_on_the_apps_data_path():
    """cluster.yaml's and the Makefile's `ray start` carry deployments.serve_mode.SERVE_ENV, which Serve reads from
    that environment."""
    config = _load("cluster.yaml")
    switches = [f"{name}={value}" for name, value in SERVE_ENV.items()]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in config[key] if "ray start" in cmd]
        assert starts and all(s in cmd for cmd in starts for s in switches), key
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "$(SERVE_ENV) $(VENV)/bin/ray start" in makefile
    assert all(s in makefile.split("SERVE_ENV ?=")[1].splitlines()[0] for s in switches)


def test_cluster_yaml_validation_catches_a_typo():
    config = _load("cluster.yaml")
    config["available_node_types"]["head_cpu"]["min_worker"] = 0  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


@pytest.mark.parametrize(
    "name", ["serve_config.yaml", "serve_config.gpu.yaml", "deployments/configs/h100x4_router.yaml"]
)
def test_serve_configs_are_valid(name, offline_hub):
    config = _load(name)
    ServeDeploySchema.model_validate(config)  # Serve's own schema of `serve deploy` files
    app = config["applications"][0]
    assert app["import_path"] == "deployments.app:build_app"
    parsed = parse_app_config(app["args"])
    if name == "serve_config.yaml":
        assert parsed.engine.num_replicas == 2 and parsed.engine.num_cpus == 0
        assert parsed.device == "cpu"
    elif name == "serve_config.gpu.yaml":
        assert parsed.model == "meta-llama/Meta-Llama-3-8B-Instruct"
        # One GPU per replica, batch slots sized from the pool (docs/serving.md#routing: more per GPU than TP=2).
        assert parsed.tensor_parallel_size == 1 and "max_batch_size" not in parsed.engine_kwargs
    else:
        assert parsed.engine.num_replicas == 4 and parsed.engine.router == "page_aware"
    build_app(app["args"])  # builds the deployment graph (no cluster needed)


@pytest.mark.parametrize(
    "args,field",
    [
        ({"engine": {"num_replicas": 0}}, "engine"),
        ({"engine": {"router": "fastest"}}, "engine.router"),
        ({"engine": {"max_ongoing_requests": 0}}, "engine.max_ongoing_requests"),
        ({"ingress": {"overload_status_code": 500}}, "ingress.overload_status_code"),
        ({"engine": {"roomy_free_page_fraction": 1.5}}, "engine.roomy_free_page_fraction"),
        ({"modle": "smollm2"}, "modle"),
        ({"engine_kwargs": {"max_batch_size": 0}}, "max_batch_size"),
        ({"engine_kwargs": {"max_batch_sise": 4}}, "max_batch_sise"),
        ({"engine_kwargs": {"kv_cache_bytes": 1 << 20}}, r"kv_cache_bytes \(now kv_cache_memory_bytes\)"),
        ({"engine_kwargs": {"gpu_memory_fraction": 0.5}}, r"gpu_memory_fraction \(now kv_cache_memory_fraction\)"),
        ({"engine_kwargs": {"kv_layout": "token_major"}}, r"kv_layout \(now kv_cache_layout\)"),
    ],
)
def test_bad_app_config_names_the_field(args, field):
    with pytest.raises(AppConfigError, match=field.replace(".", r"\.")):
        build_app(args)


def test_page_aware_router_options_reach_the_router_and_the_rest_keep_its_defaults():
    from deployments.app import _page_aware_kwargs
    from deployments.page_aware_router import PageAwareRequestRouter

    config = parse_app_config({"engine": {"roomy_free_page_fraction": 0, "prefix_affinity": False}})
    kwargs = _page_aware_kwargs(config.engine)
    assert kwargs == {"prefix_affinity": False, "roomy_free_page_fraction": 0}
    router = PageAwareRequestRouter.__new__(PageAwareRequestRouter)
    router.initialize_state(**kwargs)  # the router takes them (it rejects unknown kwargs)
    assert router._roomy_free_page_fraction == 0 and router._prefix_affinity is False
    assert _page_aware_kwargs(parse_app_config({}).engine) == {"prefix_affinity": True}


def test_app_fails_at_build_time_on_a_model_it_cannot_load(tmp_path, offline_hub):
    """Resolved in the deploying process: `serve deploy` fails, naming the model and the cause, before any
    replica starts (and before any weight is downloaded)."""
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (tmp_path / "ckpt").mkdir()
    save_tiny_checkpoint(tmp_path / "ckpt", "mistral", sliding_window=64)
    for args, cause in [
        ({"model": "nobody/nothing"}, r"model 'nobody/nothing': .*not in the local Hugging Face cache"),
        ({"model": str(empty_dir)}, "has no config.json"),
        ({"model": str(tmp_path / "ckpt"), "engine_kwargs": {"max_seq_len": 128}}, r"sliding_window \(64\)"),
        (
            {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "tensor_parallel_size": 3},
            r"tensor_parallel_size \(3\) must divide",
        ),
    ]:
        with pytest.raises(AppConfigError, match=r"invalid application args: model: .*" + cause):
            build_app(args)


def test_every_config_field_is_described():
    from deployments.config import AppConfig, EngineDeploymentConfig, IngressConfig

    for model in (AppConfig, EngineDeploymentConfig, IngressConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
