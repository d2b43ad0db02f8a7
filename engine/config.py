"""Engine configuration dataclasses.

Each config validates itself in ``__post_init__`` and raises ``ValueError`` naming the field and
the allowed range, so a bad YAML/HTTP value fails at construction rather than deep in the engine.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields

from kvcache.config import DEFAULT_KV_CACHE_MEMORY_FRACTION, LAYOUTS

ATTENTION_BACKENDS = ("auto", "sdpa", "torch_flash", "triton_flash", "flashinfer", "flash_attn")
DTYPES = ("auto", "float32", "float16", "bfloat16")

DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_CPU_KV_CACHE_MEMORY_BYTES = 256 << 20
DEFAULT_CPU_MAX_BATCH_SIZE = 16
# On the GPU each page costs ~27 us of driver calls (H100, benchmarks/results/kvcache_h100.json): requests decoding
# in lockstep would all map their next page at the same step, stalling it. Mapping it over the 128 steps before,
# at most 128 pages (~3.5 ms) a step, keeps it behind the forwards.
GPU_PREFETCH_TOKENS = 128
GPU_PREFETCH_PAGES_PER_STEP = 128

# Keys that an earlier release spelled differently: a config that still uses one fails naming the new key.
RENAMED_KEYS = {
    "kv_cache_bytes": "kv_cache_memory_bytes",
    "pool_size_bytes": "kv_cache_memory_bytes",
    "gpu_memory_fraction": "kv_cache_memory_fraction",
    "memory_fraction": "kv_cache_memory_fraction",
    "kv_layout": "kv_cache_layout",
    "layout": "kv_cache_layout",
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ModelConfig:
    """Which model to run and how.

    Attributes:
        model: ``"smollm2"`` (the embedded default SmolLM2-135M-Instruct GGUF), a Hugging Face Hub id
            (``"org/name"`` or ``"org/name@revision"``), an ``s3://`` or ``gs://`` prefix, a directory with
            ``config.json`` + ``*.safetensors``, a path to a ``.gguf`` file, or
            ``"dummy:<name-or-path-of-config.json>"`` for seeded random weights at real shapes
            (named configs: see ``engine.weights.NAMED_CONFIGS``, e.g. ``dummy:llama-3-8b``).
            See ``engine.weights.resolve_model``.
        dtype: ``"auto"`` = float32 on CPU, bfloat16 on GPU; or an explicit torch dtype name.
        device: ``"auto"`` = ``"cuda"`` when available else ``"cpu"``; or ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        attention_backend: ``"auto"`` = ``sdpa`` on CPU (or in float32); on GPU ``flashinfer`` (Triton
            split-KV decode + FlashInfer's FA3 prefill on Hopper, FA2 elsewhere) when FlashInfer and Triton are
            importable, else ``flash_attn`` when it is, else ``triton_flash`` (Triton split-KV decode + torch's FA2
            varlen prefill) when Triton is, else ``torch_flash``; or one of those names.
        seed: seed for dummy weights.
        tensor_parallel_size: number of tensor-parallel ranks.
        enforce_eager: never use CUDA graphs (decode steps are otherwise replayed from graphs
            captured at fixed batch-size buckets on GPU).
        cuda_graph_max_batch_size: largest decode batch served from a graph (vLLM's capture ceiling, 512); larger
            ones run eagerly.
    """

    model: str = "smollm2"
    dtype: str = "auto"
    device: str = "auto"
    attention_backend: str = "auto"
    seed: int = 0
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    cuda_graph_max_batch_size: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        if not _is_int(self.cuda_graph_max_batch_size) or self.cuda_graph_max_batch_size < 1:
            raise ValueError(f"cuda_graph_max_batch_size must be an int >= 1, got {self.cuda_graph_max_batch_size!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not _is_int(self.tensor_parallel_size) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {self.tensor_parallel_size!r}")

    def resolved_device(self) -> str:
        """The concrete torch device string (``"auto"`` resolved)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self):
        """The concrete ``torch.dtype`` (``"auto"``: float32 on CPU, bfloat16 on GPU)."""
        import torch

        if self.dtype == "auto":
            return torch.float32 if self.resolved_device() == "cpu" else torch.bfloat16
        return getattr(torch, self.dtype)

    def resolved_attention_backend(self) -> str:
        """The concrete attention backend name (``"auto"`` resolved for the device)."""
        if self.attention_backend != "auto":
            return self.attention_backend
        import torch

        # FlashAttention kernels take only 16-bit inputs.
        if self.resolved_device() == "cpu" or self.resolved_dtype() == torch.float32:
            return "sdpa"
        has_triton = _importable("triton")
        if has_triton and _importable("flashinfer"):
            return "flashinfer"
        if _importable("flash_attn"):
            return "flash_attn"
        return "triton_flash" if has_triton else "torch_flash"


def _importable(module: str) -> bool:
    """Whether ``import module`` succeeds (an installed but broken package counts as absent, whatever it raises:
    a CUDA library mismatch surfaces as an ``OSError`` or a ``RuntimeError``)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure to import means the backend cannot be used
        return False
    return True


@dataclass
class CacheConfig:
    """Sizing of the vAttention KV cache.

    Attributes:
        max_batch_size: number of batch slots (concurrent sequences holding KV), >= 1; ``None`` = on GPU, sized
            from the page pool (as many requests as it holds at one page per buffer, at most 1024, vLLM's ceiling
            on an H100: a slot costs virtual addresses only), on CPU 16.
        max_seq_len: tokens per slot (prompt + output); ``None`` = the model's max position
            embeddings capped at ``DEFAULT_MAX_SEQ_LEN`` (4096) and at its sliding window.
        page_size_bytes: physical page size; ``None`` = backend default (64 KiB host, 2 MiB CUDA).
        kv_cache_memory_bytes: size of the physical page pool (vLLM's name for the same setting); if ``None``,
            ``kv_cache_memory_fraction`` of the free device memory is used on GPU, and 256 MiB on CPU.
        kv_cache_memory_fraction: fraction of the GPU memory free after the weights are loaded that the pool
            takes when ``kv_cache_memory_bytes`` is None (unlike vLLM's ``gpu_memory_utilization``, a fraction of
            the free memory, not of the whole device).
        kv_cache_layout: ``"layer_major"`` (a page holds one layer's K or V of ``page / (H * D * itemsize)`` tokens) or
            ``"token_major"`` (a page holds every layer's K and V of ``page / (2 * L * H * D * itemsize)`` tokens:
            far less memory held beyond a request's tokens with 2 MiB pages); see ``kvcache.KVCacheConfig.kv_cache_layout``.
            ``None`` = token-major on GPU (1.25x the decode-heavy throughput of layer-major on an H100, as many
            requests fit as with 16-token paging), layer-major on CPU (64 KiB pages waste little there).
        prefetch_tokens: tokens mapped eagerly beyond what the next step needs; ``None`` = 128 on GPU (a
            request's next page is mapped over the 128 steps before it is written), 0 on CPU.
        prefetch_pages_per_step: most pages mapped ahead per step; ``None`` = 128 on GPU (~3.5 ms of driver
            calls on an H100, hidden behind the forward), no limit on CPU.
        enable_prefix_caching: reuse the KV of full blocks of tokens that earlier requests computed (same
            physical pages mapped into the new request's slot; see ``kvcache.cache``), in either layout.
    """

    max_batch_size: int | None = None
    max_seq_len: int | None = None
    page_size_bytes: int | None = None
    kv_cache_memory_bytes: int | None = None
    kv_cache_memory_fraction: float = DEFAULT_KV_CACHE_MEMORY_FRACTION
    kv_cache_layout: str | None = None
    prefetch_tokens: int | None = None
    prefetch_pages_per_step: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if self.max_batch_size is not None and (not _is_int(self.max_batch_size) or self.max_batch_size < 1):
            raise ValueError(f"max_batch_size must be None or an int >= 1, got {self.max_batch_size!r}")
        if self.max_seq_len is not None and (not _is_int(self.max_seq_len) or self.max_seq_len < 1):
            raise ValueError(f"max_seq_len must be None or an int >= 1, got {self.max_seq_len!r}")
        if self.page_size_bytes is not None and (not _is_int(self.page_size_bytes) or self.page_size_bytes < 4096):
            raise ValueError(f"page_size_bytes must be None or an int >= 4096, got {self.page_size_bytes!r}")
        if self.kv_cache_memory_bytes is not None and (
            not _is_int(self.kv_cache_memory_bytes) or self.kv_cache_memory_bytes < 1
        ):
            raise ValueError(f"kv_cache_memory_bytes must be None or an int >= 1, got {self.kv_cache_memory_bytes!r}")
        if (
            not isinstance(self.kv_cache_memory_fraction, (int, float))
            or not 0.0 < self.kv_cache_memory_fraction <= 1.0
        ):
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction!r}")
        if self.kv_cache_layout is not None and self.kv_cache_layout not in LAYOUTS:
            raise ValueError(f"kv_cache_layout must be one of {LAYOUTS}, got {self.kv_cache_layout!r}")
        if self.prefetch_tokens is not None and (not _is_int(self.prefetch_tokens) or self.prefetch_tokens < 0):
            raise ValueError(f"prefetch_tokens must be None or an int >= 0, got {self.prefetch_tokens!r}")
        if self.prefetch_pages_per_step is not None and (
            not _is_int(self.prefetch_pages_per_step) or self.prefetch_pages_per_step < 1
        ):
            raise ValueError(
                f"prefetch_pages_per_step must be None or an int >= 1, got {self.prefetch_pages_per_step!r}"
            )

    def resolved_max_batch_size(self, on_gpu: bool) -> int | None:
        """``max_batch_size`` with ``None`` resolved on CPU (16); on GPU ``None`` stays, for the cache to size from
        its pool (``kvcache.config.batch_slots_for_pool``)."""
        if self.max_batch_size is not None or on_gpu:
            return self.max_batch_size
        return DEFAULT_CPU_MAX_BATCH_SIZE

    def resolved_kv_cache_layout(self, on_gpu: bool) -> str:
        """``kv_cache_layout`` with ``None`` resolved: token-major on GPU, layer-major on CPU."""
        return self.kv_cache_layout or ("token_major" if on_gpu else "layer_major")

    def resolved_prefetch_tokens(self, on_gpu: bool) -> int:
        """``prefetch_tokens`` with ``None`` resolved: ``GPU_PREFETCH_TOKENS`` on GPU, 0 on CPU."""
        if self.prefetch_tokens is not None:
            return self.prefetch_tokens
        return GPU_PREFETCH_TOKENS if on_gpu else 0

    def resolved_prefetch_pages_per_step(self, on_gpu: bool) -> int | None:
        """``prefetch_pages_per_step`` with ``None`` resolved: ``GPU_PREFETCH_PAGES_PER_STEP`` on GPU, no limit
        (``None``) on CPU."""
        if self.prefetch_pages_per_step is not None:
            return self.prefetch_pages_per_step
        return GPU_PREFETCH_PAGES_PER_STEP if on_gpu else None


@dataclass
class SchedulerConfig:
    """Continuous-batching limits.

    Attributes:
        max_num_seqs: most sequences in one forward; ``None`` = the cache's ``max_batch_size``
            (it can never exceed the number of slots).
        max_num_batched_tokens: most new tokens in one forward (decode tokens + prefill chunks);
            longer prompts are prefilled in chunks of at most this many tokens.
        async_scheduling: launch each step before the previous step's sampled tokens reach the host, so that
            scheduling, detokenization and outputs run while the device computes. Costs one wasted decode row
            per request that stops on EOS or a stop string. Off under tensor parallelism and for a step
            where a running request uses presence/frequency penalties (they need the last token on the host).
    """

    max_num_seqs: int | None = None
    max_num_batched_tokens: int = 2048
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs is not None and (
            not isinstance(self.max_num_seqs, int) or isinstance(self.max_num_seqs, bool) or self.max_num_seqs < 1
        ):
            raise ValueError(f"max_num_seqs must be None or an int >= 1, got {self.max_num_seqs!r}")
        if (
            not isinstance(self.max_num_batched_tokens, int)
            or isinstance(self.max_num_batched_tokens, bool)
            or self.max_num_batched_tokens < 1
        ):
            raise ValueError(f"max_num_batched_tokens must be an int >= 1, got {self.max_num_batched_tokens!r}")
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be a bool, got {self.async_scheduling!r}")


@dataclass
class EngineConfig:
    """Everything an ``LLMEngine`` needs: model, KV cache sizing and scheduling.

    Attributes:
        model, cache, scheduler: the component configs.
        sampler_seed: seed of the engine-wide randomness used by requests without their own
            ``seed``; ``None`` = nondeterministic.
        engine_process: run the step loop (``AsyncLLMEngine``'s core) in a process of its own, so that the
            serving side's per-token work never holds the GIL a step needs; off: in a thread of the caller's
            process. On by default, CPU included (on 2 cores it gave 1.06x the served throughput of the thread:
            benchmarks/results/served_vs_offline_cpu.json). Under tensor parallelism the loop always runs in the
            replica's process (it drives the TP worker actors from there).
        step_timeout_s: the longest the engine core may go without finishing a step while requests are open
            before the engine counts as dead (vLLM's engine iteration timeout): a step that never returns (a hung
            kernel or collective, a stopped core process) otherwise leaves the replica reported healthy while its
            requests hang. ``None``: never. Grammars compiling alone do not count (the core says it is alive every
            ``engine_core.HEARTBEAT_PERIOD_S``, a second). Keep it well above the longest step there can be (a
            prefill chunk, a first step that compiles kernels).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampler_seed: int | None = None
    engine_process: bool = True
    step_timeout_s: float | None = 300.0

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))
            elif not isinstance(value, cls):
                raise ValueError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")
        if self.sampler_seed is not None and (not isinstance(self.sampler_seed, int) or self.sampler_seed < 0):
            raise ValueError(f"sampler_seed must be None or an int >= 0, got {self.sampler_seed!r}")
        if not isinstance(self.engine_process, bool):
            raise ValueError(f"engine_process must be a bool, got {self.engine_process!r}")
        if self.step_timeout_s is not None and (
            not isinstance(self.step_timeout_s, (int, float))
            or isinstance(self.step_timeout_s, bool)
            or not self.step_timeout_s > 0
        ):
            raise ValueError(f"step_timeout_s must be None or a number > 0, got {self.step_timeout_s!r}")

    def resolved_engine_process(self) -> bool:
        """Whether ``AsyncLLMEngine`` runs its core in a process of its own: ``engine_process``, but never under
        tensor parallelism."""
        return self.engine_process and self.model.tensor_parallel_size == 1

    @classmethod
    def from_dict(cls, values: dict) -> EngineConfig:
        """Build from ``{"model": {...}, "cache": {...}, "scheduler": {...}, "sampler_seed": ...}`` or from
        flat keys (``{"model": "smollm2", "max_batch_size": 8, ...}``), each routed to the config that has
        that field. Unknown keys raise ``ValueError`` naming them."""
        values = dict(values)
        nested: dict[str, dict] = {"model": {}, "cache": {}, "scheduler": {}}
        for name in nested:
            if isinstance(values.get(name), dict):
                nested[name].update(values.pop(name))
        top = {key: values.pop(key) for key in ("sampler_seed", "engine_process", "step_timeout_s") if key in values}
        owners = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}
        unknown = []
        for key, value in values.items():
            owner = next((n for n, c in owners.items() if key in {f.name for f in fields(c)}), None)
            if owner is None:
                unknown.append(key)
            else:
                nested[owner][key] = value
        renamed = [f"{key} (now {RENAMED_KEYS[key]})" for key in sorted(unknown) if key in RENAMED_KEYS]
        if renamed:
            raise ValueError(f"renamed engine config keys: {', '.join(renamed)}")
        if unknown:
            raise ValueError(f"unknown engine config keys: {sorted(unknown)}")
        return cls(
            model=ModelConfig(**nested["model"]),
            cache=CacheConfig(**nested["cache"]),
            scheduler=SchedulerConfig(**nested["scheduler"]),
            **top,
        )
