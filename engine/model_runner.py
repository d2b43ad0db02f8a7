"""ModelRunner: loads the model, owns the vAttention KV cache, runs forward batches."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import torch

from engine.batch import ForwardBatch, to_device
from engine.config import DEFAULT_CPU_KV_CACHE_MEMORY_BYTES, DEFAULT_MAX_SEQ_LEN, CacheConfig, EngineConfig, ModelConfig
from engine.model import LlamaForCausalLM, check_sliding_window, sliding_window_of
from engine.weights import ResolvedModel, get_weight_loader, read_generation_config, resolve_model
from kvcache import KVCache, KVCacheConfig

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build parameters directly in ``dtype`` (no float32 copy of a bf16 model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest ``value`` over the tensor-parallel group (every rank calls this at the same point)."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def max_model_len_of(hf_config, cache_config: CacheConfig) -> int:
    """Tokens one sequence may hold (prompt + output): ``cache_config.max_seq_len``, else the model's
    ``max_position_embeddings`` capped at ``DEFAULT_MAX_SEQ_LEN`` and at its sliding window.

    Raises:
        ValueError: ``max_seq_len`` past the model's positions or its sliding window.
    """
    max_positions = getattr(hf_config, "max_position_embeddings", DEFAULT_MAX_SEQ_LEN)
    if cache_config.max_seq_len is not None and cache_config.max_seq_len > max_positions:
        raise ValueError(
            f"max_seq_len must be <= the model's max_position_embeddings ({max_positions}), "
            f"got {cache_config.max_seq_len}"
        )
    default = min(max_positions, DEFAULT_MAX_SEQ_LEN, sliding_window_of(hf_config) or max_positions)
    max_model_len = cache_config.max_seq_len or default
    check_sliding_window(hf_config, max_model_len)
    return max_model_len


def check_model(config: EngineConfig) -> ResolvedModel:
    """What can be checked of an engine's model before loading its weights (a deployment checks it before
    starting any replica): the model resolves (its small files fetched), its architecture is supported, its
    shapes split ``tensor_parallel_size`` ways and ``max_seq_len`` fits it.

    Raises:
        ValueError: naming the cause (a :class:`~engine.weights.ModelSourceError` for the model itself).
    """
    from engine.tp_executor import check_tp_shapes

    resolved = resolve_model(config.model.model)
    if config.model.tensor_parallel_size > 1:
        check_tp_shapes(resolved.hf_config, config.model.tensor_parallel_size)
    max_model_len_of(resolved.hf_config, config.cache)
    return resolved


class ModelRunner:
    """Owns the model and its KV cache on one device (one tensor-parallel rank).

    Attributes:
        model: the :class:`LlamaForCausalLM`.
        kv_cache: the ``kvcache.KVCache`` (a ``VirtualKVCache`` unless ``kv_cache_factory`` says otherwise) sized
            from ``cache_config`` and the model's KV shape.
        hf_config: the transformers config.
        resolved: the :class:`ResolvedModel` (tokenizer dir, weight source).
        device, dtype, attention_backend: as resolved from ``model_config``.
        max_model_len: tokens one sequence may hold (prompt + output) = the cache's ``max_seq_len``.
        eos_token_ids: token ids that end generation (generation config + model config).

    ``kv_cache_factory(KVCacheConfig)`` (default ``VirtualKVCache``) builds another ``kvcache.KVCache``
    implementation, and ``attention_backend`` (an ``AttentionBackend`` subclass instead of ``model_config``'s backend
    name) is the attention that reads it; ``benchmarks/paged_kv.py`` plugs a vLLM-style block pool in this way.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        tp_rank: int = 0,
        *,
        kv_cache_factory: Callable[[KVCacheConfig], KVCache] | None = None,
        attention_backend=None,
    ) -> None:
        from kvcache import VirtualKVCache

        self.model_config = model_config
        self.cache_config = cache_config
        self.device = torch.device(model_config.resolved_device())
        self.dtype = model_config.resolved_dtype()
        backend = attention_backend or model_config.resolved_attention_backend()
        self.attention_backend = backend if isinstance(backend, str) else backend.name
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)

        start = time.perf_counter()
        self.resolved = resolve_model(model_config.model)
        self.hf_config = self.resolved.hf_config
        self.max_model_len = max_model_len_of(self.hf_config, cache_config)  # before any weight is fetched
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = LlamaForCausalLM(self.hf_config, backend, tp_rank, model_config.tensor_parallel_size)
        self.model.eval()
        get_weight_loader(self.resolved, seed=model_config.seed).load_into(self.model)
        logger.info(
            "loaded %s (%s, %s, %s attention) in %.1f s",
            model_config.model,
            self.device,
            self.dtype,
            self.attention_backend,
            time.perf_counter() - start,
        )

        pool_kwargs = {}
        if cache_config.kv_cache_memory_bytes is not None:
            pool_kwargs["kv_cache_memory_bytes"] = cache_config.kv_cache_memory_bytes
        elif self.device.type == "cuda" and model_config.tensor_parallel_size > 1:
            # Ranks replay rank 0's page decisions, so every rank's pool must hold the same number of pages:
            # size them all by the rank with the least free memory.
            pool_kwargs["kv_cache_memory_bytes"] = _min_over_ranks(
                int(torch.cuda.mem_get_info(self.device)[0] * cache_config.kv_cache_memory_fraction), self.device
            )
        elif self.device.type == "cuda":
            pool_kwargs["kv_cache_memory_fraction"] = cache_config.kv_cache_memory_fraction
        else:
            pool_kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_MEMORY_BYTES
        on_gpu = self.device.type == "cuda"
        self.kv_cache = (kv_cache_factory or VirtualKVCache)(
            KVCacheConfig(
                num_layers=self.hf_config.num_hidden_layers,
                num_kv_heads=self.model.num_kv_heads_local,
                head_dim=self.model.head_dim,
                max_batch_size=cache_config.resolved_max_batch_size(on_gpu),
                max_seq_len=self.max_model_len,
                dtype=self.dtype,
                device=str(self.device),
                page_size_bytes=cache_config.page_size_bytes,
                kv_cache_layout=cache_config.resolved_kv_cache_layout(on_gpu),
                prefetch_tokens=cache_config.resolved_prefetch_tokens(on_gpu),
                prefetch_pages_per_step=cache_config.resolved_prefetch_pages_per_step(on_gpu),
                **pool_kwargs,
            )
        )
        self.eos_token_ids = self._eos_token_ids()
        self.model.attn_backend.compile_kernels(self.kv_cache)
        self.graph_runner = None
        if (
            self.device.type == "cuda"
            and not model_config.enforce_eager
            and self.model.attn_backend.supports_cuda_graphs
        ):
            from engine.cuda_graph_runner import CudaGraphRunner

            start = time.perf_counter()
            self.graph_runner = CudaGraphRunner(
                self.model,
                self.kv_cache,
                min(model_config.cuda_graph_max_batch_size, self.kv_cache.config.max_batch_size),
                self.max_model_len,
            )
            logger.info(
                "captured decode CUDA graphs for batch sizes %s in %.1f s",
                self.graph_runner.buckets,
                time.perf_counter() - start,
            )

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()

        def add(value) -> None:
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)

        add(getattr(self.hf_config, "eos_token_id", None))
        add(read_generation_config(self.resolved).get("eos_token_id"))
        return ids

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    def build_batch(self, seqs) -> ForwardBatch:
        """``ForwardBatch.build`` for this runner's device (see its docstring for ``seqs``)."""
        return ForwardBatch.build(seqs, self.device)

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """Run one forward: writes the batch's K/V into the cache and returns the logits of each
        sequence's last token, ``[N, vocab]`` float32 on the device (asynchronous on GPU).

        The cache rows ``[0, seq_lens[i])`` of every slot must be mapped (allocate/grow first).
        """
        hidden = self.model(batch, self.kv_cache)
        return self.model.compute_logits(hidden[batch.logits_indices])

    @torch.inference_mode()
    def run(self, seqs, prev_token_ids: torch.Tensor | None = None, prev_rows: list[int] | None = None) -> torch.Tensor:
        """Forward of ``seqs`` (``(slot, token_ids, start_pos)`` per sequence, as ``ForwardBatch.build``):
        decode batches replay a CUDA graph when one holds them, anything else runs eagerly.

        A sequence whose last token was sampled by the previous step and is not on the host yet has it as a
        placeholder in ``token_ids``: ``prev_rows[i]`` is then its row in ``prev_token_ids`` (the previous
        step's sampled ids, on the device), else -1.

        Returns the logits of each sequence's last token, ``[N, vocab]`` float32 (asynchronous on GPU)."""
        fill = None
        if prev_rows is not None and any(r >= 0 for r in prev_rows):
            fill = (prev_token_ids, prev_rows)
        if self.graph_runner is not None and self.graph_runner.can_run(seqs):
            return self.graph_runner.run(seqs, fill)
        batch = self.build_batch(seqs)
        if fill is not None:
            # Each placeholder is the last token of its sequence: the row before the next sequence starts.
            rows = [(batch.cu_seqlens_q_cpu[i + 1] - 1, r) for i, r in enumerate(prev_rows) if r >= 0]
            dst, src = zip(*rows)
            index = to_device([list(dst), list(src)], torch.int64, self.device)
            batch.input_ids[index[0]] = prev_token_ids[index[1]]
        return self.execute(batch)

    def release_graphs(self) -> None:
        """Destroys the CUDA graphs without waiting for the device: a replay still running completes first (the
        driver frees an executing graph when it is done, and their memory pool is only marked free). Under TP a
        graph that captured a collective holds NCCL's communicator, and both leaving and aborting the group wait
        until no graph does: a group is aborted only after this."""
        if self.graph_runner is not None:
            self.graph_runner.close()
            self.graph_runner = None

    def close(self) -> None:
        """Release the CUDA graphs (before the group is left: see :meth:`release_graphs`), then the KV cache's
        memory once the device is done with it."""
        self.release_graphs()
        self.kv_cache.close()
