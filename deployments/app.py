"""Application builder: ``serve run deployments.app:build_app`` or ``import_path`` in serve_config.yaml.

Deployments are built from the validated config here (not decorated at import time), so the YAML
decides replicas, resources, backpressure and the router.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from deployments.config import DEFAULT_ROUTER_PATH, AppConfig
from deployments.engine_deployment import EngineDeployment
from deployments.ingress import OpenAIIngress
from deployments.page_aware_router import PageAwareRequestRouter

ENGINE_DEPLOYMENT_NAME = "EngineDeployment"
INGRESS_DEPLOYMENT_NAME = "OpenAIIngress"


class AppConfigError(ValueError):
    """The application's ``args`` are invalid; the message lists every bad field."""


def parse_app_config(args: dict[str, Any] | AppConfig | None) -> AppConfig:
    """Validate ``args`` into an ``AppConfig``, raising ``AppConfigError`` naming each bad field."""
    from engine.config import EngineConfig

    if isinstance(args, AppConfig):
        config = args
    else:
        try:
            config = AppConfig.model_validate(args or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
            )
            raise AppConfigError(f"invalid application args: {problems}") from None
    # Check the engine fields here, in the deploying process, rather than in every replica's constructor.
    try:
        engine_config = EngineConfig.from_dict(config.engine_config_dict())
    except ValueError as exc:
        raise AppConfigError(f"invalid application args: engine_kwargs: {exc}") from None
    check_app_model(engine_config)
    return config


def check_app_model(engine_config) -> None:
    """Fail the deployment, not its first request, on a model the replicas could not load: fetch its small files
    (config, tokenizer; the weights are fetched by the replicas), check its architecture, tensor-parallel split
    and ``max_seq_len``, and load its tokenizer as the ingress will."""
    from engine.model_runner import check_model
    from engine.tokenizer import load_tokenizer

    try:
        load_tokenizer(check_model(engine_config))
    except (ValueError, OSError) as exc:
        raise AppConfigError(f"invalid application args: model: {exc}") from None


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """Build the OpenAI-compatible app: ingress -> (page-aware router) -> engine replicas."""
    config = parse_app_config(args)
    eng = config.engine
    router_class: Any = PageAwareRequestRouter if eng.router == "page_aware" else DEFAULT_ROUTER_PATH
    engine_options: dict[str, Any] = {
        "name": ENGINE_DEPLOYMENT_NAME,
        "max_ongoing_requests": eng.max_ongoing_requests,
        "max_queued_requests": eng.max_queued_requests,
        "health_check_period_s": eng.health_check_period_s,
        "request_router_config": RequestRouterConfig(
            request_router_class=router_class,
            request_router_kwargs=_page_aware_kwargs(eng) if eng.router == "page_aware" else {},
            request_routing_stats_period_s=eng.routing_stats_period_s,
            request_routing_stats_timeout_s=eng.routing_stats_timeout_s,
        ),
        "graceful_shutdown_timeout_s": 10.0,
        # Used when the ingress's handle rejects a call (its queue for this deployment is full).
        "backpressure_config": BackpressureConfig(
            status_code=config.ingress.overload_status_code, retry_after_s=config.ingress.retry_after_s
        ),
    }
    if eng.num_replicas == "auto" or eng.autoscaling_config is not None:
        engine_options["num_replicas"] = "auto"
        engine_options["autoscaling_config"] = eng.autoscaling_config
    else:
        engine_options["num_replicas"] = eng.num_replicas
    if config.tensor_parallel_size > 1:
        # One bundle per TP rank: the replica actor (rank 0) takes bundle 0, TP worker r takes bundle r
        # (deployments.tp_workers). A bundle may not be all zeros, hence at least one CPU per rank.
        cpus_per_rank = max(eng.num_cpus, 1.0)
        on_gpu = config.device != "cpu"
        bundle = {"GPU": 1, "CPU": cpus_per_rank} if on_gpu else {"CPU": cpus_per_rank}
        engine_options["placement_group_bundles"] = [dict(bundle) for _ in range(config.tensor_parallel_size)]
        engine_options["placement_group_strategy"] = eng.placement_group_strategy
        engine_options["ray_actor_options"] = {"num_cpus": eng.num_cpus, "num_gpus": 1 if on_gpu else 0}
        if on_gpu:
            from engine.distributed import TP_ENV_VARS

            engine_options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(TP_ENV_VARS)}
    else:
        engine_options["ray_actor_options"] = {"num_cpus": eng.num_cpus, "num_gpus": eng.num_gpus}

    ing = config.ingress
    ingress_options: dict[str, Any] = {
        "name": INGRESS_DEPLOYMENT_NAME,
        "num_replicas": ing.num_replicas,
        "ray_actor_options": {"num_cpus": ing.num_cpus},
        "max_ongoing_requests": ing.max_ongoing_requests,
        "max_queued_requests": ing.max_queued_requests,
        "backpressure_config": BackpressureConfig(
            status_code=ing.overload_status_code, retry_after_s=ing.retry_after_s
        ),
    }
    engine = serve.deployment(EngineDeployment, **engine_options)
    ingress = serve.deployment(OpenAIIngress, **ingress_options)
    return ingress.bind(engine.bind(config.engine_config_dict(), config.model_id), config.model_dump())


def _page_aware_kwargs(eng) -> dict:
    """``PageAwareRequestRouter``'s kwargs from the engine deployment's config (its own defaults where unset)."""
    kwargs = {"prefix_affinity": eng.prefix_affinity}
    if eng.roomy_free_page_fraction is not None:
        kwargs["roomy_free_page_fraction"] = eng.roomy_free_page_fraction
    return kwargs


def replica_actor_names() -> dict[str, str]:
    """``{replica tag: actor name}`` of the engine deployment's live replica actors (Ray namespace "serve"), in every
    application of the cluster: what an operator kills or inspects; the tag is what responses name in
    ``x-vattn-replica``."""
    import ray

    names = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"] if isinstance(actor, dict) else actor
        if name.startswith("SERVE_REPLICA::") and f"#{ENGINE_DEPLOYMENT_NAME}#" in name:
            names[name.rsplit("#", 1)[-1]] = name
    return names
