"""Typed configuration of the Serve application (the YAML / CLI boundary).

``serve_config.yaml`` passes ``args:`` to :func:`deployments.app.build_app`, which validates them into
:class:`AppConfig`. Every field carries a ``description``; unknown keys are rejected so that a typo in
the YAML fails at deploy time with the field's name instead of being silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

DEFAULT_ROUTER_PATH = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"

# Environment variable read by the ingress replica when ``AppConfig.api_key`` is not set.
API_KEY_ENV_VAR = "VATTN_API_KEY"


class EngineDeploymentConfig(BaseModel):
    """How the engine deployment (one AsyncLLMEngine per replica) is scheduled and routed to."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | Literal["auto"] = Field(
        default=2, description="Engine replicas; 'auto' turns on autoscaling with `autoscaling_config`."
    )
    autoscaling_config: dict[str, Any] | None = Field(
        default=None,
        description="Ray Serve autoscaling config (min_replicas, max_replicas, target_ongoing_requests, ...); "
        "used when num_replicas is 'auto' or when given.",
    )
    num_cpus: float = Field(default=0.0, ge=0, description="CPUs reserved per replica (0 on a laptop/CI).")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica when tensor_parallel_size is 1.")
    max_ongoing_requests: int = Field(
        default=32, ge=1, description="Requests a replica holds at once (running + waiting in its engine)."
    )
    max_queued_requests: int = Field(
        default=64,
        ge=-1,
        description="Requests each caller (ingress replica) queues for this deployment before answering "
        "503/429 with Retry-After; -1 = unbounded (not recommended).",
    )
    router: Literal["page_aware", "power_of_two"] = Field(
        default="page_aware",
        description="'page_aware' ranks replicas by predicted free KV pages; 'power_of_two' is Serve's default.",
    )
    prefix_affinity: bool = Field(
        default=True,
        description="With router 'page_aware': among replicas with pages to spare and queues within reach of the "
        "shortest, send a request where the most of its prompt's prefix is cached (see page_aware_router).",
    )
    roomy_free_page_fraction: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="With router 'page_aware': the fraction of a replica's page pool that must stay free after a "
        "request for the replica to rank among the 'roomy' ones, by queue length (0: every replica where the "
        "request fits ranks by queue; 1: all by pages). None: the router's default, 0.2.",
    )
    routing_stats_period_s: float = Field(
        default=0.5, gt=0, description="How often Serve calls record_routing_stats() on each replica."
    )
    routing_stats_timeout_s: float = Field(
        default=5.0, gt=0, description="How long a record_routing_stats() call may take before it is dropped."
    )
    health_check_period_s: float = Field(default=5.0, gt=0, description="Seconds between replica health checks.")
    placement_group_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="STRICT_PACK", description="Placement of a tensor-parallel replica's GPU bundles."
    )

    @model_validator(mode="after")
    def _check_autoscaling(self) -> EngineDeploymentConfig:
        if self.num_replicas == "auto" and self.autoscaling_config is None:
            self.autoscaling_config = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}
        if isinstance(self.num_replicas, int) and self.num_replicas < 1:
            raise ValueError(f"engine.num_replicas must be >= 1 or 'auto', got {self.num_replicas}")
        return self


class IngressConfig(BaseModel):
    """The OpenAI-compatible HTTP ingress."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1, description="Ingress replicas (each tokenizes and routes).")
    num_cpus: float = Field(default=0.0, ge=0, description="CPUs reserved per ingress replica.")
    max_ongoing_requests: int = Field(
        default=512, ge=1, description="Concurrent HTTP requests per ingress replica (streams are cheap)."
    )
    max_queued_requests: int = Field(
        default=256, ge=-1, description="HTTP requests the proxy queues per ingress before answering 503."
    )
    retry_after_s: float = Field(
        default=1.0, ge=0, description="Retry-After header (seconds) on overload answers (503/429)."
    )
    overload_status_code: Literal[503, 429] = Field(default=503, description="HTTP status of overload answers.")
    max_request_body_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        description="Largest HTTP request body accepted; larger ones get 413 before any parsing.",
    )


class AppConfig(BaseModel):
    """Everything ``build_app`` needs; the ``args:`` of an application in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default="smollm2",
        description="Engine model: 'smollm2' (embedded SmolLM2-135M-Instruct), a Hugging Face Hub id "
        "('org/name' or 'org/name@revision'; HF_TOKEN for gated models), an s3:// or gs:// prefix, a local "
        "directory with config.json + *.safetensors, a .gguf path, or 'dummy:<config>' for random weights at "
        "real shapes. Checked (config and tokenizer fetched) when the app is built.",
    )
    served_model_name: str | None = Field(
        default=None, description="Model id shown by /v1/models and required in requests; default: `model`."
    )
    dtype: str = Field(default="auto", description="'auto' (float32 CPU, bfloat16 GPU), float32, float16, bfloat16.")
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda'.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per replica (tensor parallel ranks).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra EngineConfig fields (e.g. max_batch_size, max_seq_len, kv_cache_memory_bytes, "
        "page_size_bytes, max_num_seqs, max_num_batched_tokens), passed to EngineConfig.from_dict.",
    )
    engine: EngineDeploymentConfig = Field(
        default_factory=EngineDeploymentConfig, description="Engine deployment scheduling and routing."
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="HTTP ingress deployment.")
    api_key: SecretStr | None = Field(
        default=None,
        description=f"When set (or when the ingress's environment has {API_KEY_ENV_VAR}), every endpoint but "
        "/health requires `Authorization: Bearer <key>`; otherwise 401. Never logged.",
    )

    @field_validator("model")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model must be a non-empty string")
        return value

    def resolved_api_key(self, environ: Mapping[str, str]) -> str | None:
        """The API key to enforce: the config's, else ``environ[API_KEY_ENV_VAR]``; ``None`` = no auth."""
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        return environ.get(API_KEY_ENV_VAR) or None

    @property
    def model_id(self) -> str:
        """The id clients send as ``model`` and /v1/models lists."""
        return self.served_model_name or self.model

    def engine_config_dict(self) -> dict[str, Any]:
        """The dict handed to ``EngineConfig.from_dict`` inside each replica."""
        cfg: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "device": self.device,
            "tensor_parallel_size": self.tensor_parallel_size,
        }
        cfg.update(self.engine_kwargs)
        return cfg
