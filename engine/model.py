"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2, Yi) over the vAttention KV cache.

Sliding-window attention (Mistral v0.1, Qwen2 with ``use_sliding_window``) is not implemented: attention is
full, which matches those models only up to the window length, so :func:`check_sliding_window` refuses a
``max_seq_len`` past it.

One flattened batch mixes prefill chunks and decode tokens: every layer works on ``[T, ...]``
token rows; only attention needs per-sequence metadata (``ForwardBatch``), and it reads and
writes K/V in place in the cache. Parameter names follow Hugging Face's except for the fused
``qkv_proj`` and ``gate_up_proj``, filled from the separate checkpoint tensors by ``load_weights``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from engine.attention import AttentionBackend, get_attention_backend
from engine.batch import ForwardBatch
from engine.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    apply_rotary,
    get_rope,
)
from engine.layers.tp import CheckpointTensor, load_whole
from engine.layers.triton_dispatch import use_triton

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "yi")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# checkpoint name fragment -> (our fused parameter fragment, shard id)
_STACKED_PARAMS = (
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)


def head_dim_of(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def check_hf_config(hf_config: Any) -> None:
    """Raise ``ValueError`` naming what this model cannot run: the architecture, ``model_type``, activation or
    RoPE variant. Cheap (no weights), so a deployment can check it before any replica starts."""
    architectures = getattr(hf_config, "architectures", None) or []
    if architectures and not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(f"architecture {architectures} is not supported; supported: {SUPPORTED_ARCHITECTURES}")
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {hf_config.model_type!r}")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be 'silu', got {hf_config.hidden_act!r}")
    get_rope(hf_config, head_dim_of(hf_config))  # raises on an unsupported rope_type


def sliding_window_of(hf_config: Any) -> int | None:
    """The attention window of a config, or ``None`` when every layer attends to the whole sequence (Qwen2's
    config keeps ``sliding_window`` only under ``use_sliding_window`` and lists the layers using it)."""
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def check_sliding_window(hf_config: Any, max_seq_len: int) -> None:
    """Refuse a ``max_seq_len`` longer than the model's attention window: attention here is full, which equals
    windowed attention only while a sequence fits in the window."""
    window = sliding_window_of(hf_config)
    if window is not None and window < max_seq_len:
        raise ValueError(
            f"max_seq_len ({max_seq_len}) must be <= the model's sliding_window ({window}): sliding-window "
            "attention is not implemented"
        )


class LlamaAttention(nn.Module):
    def __init__(self, hf_config: Any, layer_idx: int, backend: AttentionBackend, tp_rank: int, tp_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = backend
        self.head_dim = head_dim_of(hf_config)
        # Qwen2 has biases on q/k/v (not on o) without saying so in its config.
        qkv_bias = bool(getattr(hf_config, "attention_bias", False)) or hf_config.model_type == "qwen2"
        o_bias = bool(getattr(hf_config, "attention_bias", False)) and hf_config.model_type != "qwen2"
        self.qkv_proj = QKVParallelLinear(
            hf_config.hidden_size,
            self.head_dim,
            hf_config.num_attention_heads,
            hf_config.num_key_value_heads,
            qkv_bias,
            tp_rank,
            tp_size,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            hf_config.num_attention_heads * self.head_dim, hf_config.hidden_size, o_bias, tp_rank, tp_size
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, meta: Any, kv_cache
    ) -> torch.Tensor:
        """``x [T, hidden]`` -> ``[T, hidden]``; ``meta``: the backend's ``build_metadata`` of this forward."""
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        if use_triton(q):  # one in-place launch for q and k instead of ~18 torch kernels
            from engine.layers import triton_ops

            triton_ops.apply_rotary_qk_(q, k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(self.layer_idx, q, k, v, batch, meta, kv_cache)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, hf_config: Any, tp_rank: int, tp_size: int):
        super().__init__()
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {hf_config.hidden_act!r}")
        bias = bool(getattr(hf_config, "mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(
            hf_config.hidden_size, [hf_config.intermediate_size] * 2, bias, tp_rank, tp_size
        )
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(hf_config.intermediate_size, hf_config.hidden_size, bias, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hf_config: Any, layer_idx: int, backend: AttentionBackend, tp_rank: int, tp_size: int):
        super().__init__()
        self.self_attn = LlamaAttention(hf_config, layer_idx, backend, tp_rank, tp_size)
        self.mlp = LlamaMLP(hf_config, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, x, residual, cos, sin, batch, meta, kv_cache):
        """Pre-norm block on the running residual stream: returns ``(x, residual)``, both ``[T, hidden]``."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, batch, meta, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, hf_config: Any, backend: AttentionBackend, tp_rank: int, tp_size: int):
        super().__init__()
        self.backend = backend
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size, tp_rank, tp_size)
        self.rotary_emb = get_rope(hf_config, head_dim_of(hf_config))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, i, backend, tp_rank, tp_size) for i in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, batch: ForwardBatch, kv_cache) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        cos, sin = self.rotary_emb(batch.positions)  # shared by all layers
        meta = self.backend.build_metadata(batch, kv_cache)  # where the batch's KV lives, for every layer
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, batch, meta, kv_cache)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    """Causal LM over a flattened mixed batch.

    Args:
        hf_config: a transformers ``PretrainedConfig`` of a supported ``model_type``.
        attention_backend: a backend name (``sdpa``, ``torch_flash``, ``triton_flash``, ``flash_attn``), or an
            ``AttentionBackend`` subclass, instantiated with this rank's head counts (how the benchmark-only paged
            mode, ``benchmarks/paged_kv.py``, plugs its backend in).
        tp_rank, tp_size: tensor-parallel position; weights are sharded by ``load_weights``.
    """

    def __init__(
        self,
        hf_config: Any,
        attention_backend: str | type[AttentionBackend] = "sdpa",
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        super().__init__()
        check_hf_config(hf_config)
        self.hf_config = hf_config
        self.tp_rank, self.tp_size = tp_rank, tp_size
        head_dim = head_dim_of(hf_config)
        self.num_kv_heads_local = max(1, hf_config.num_key_value_heads // tp_size)
        self.head_dim = head_dim
        heads = (hf_config.num_attention_heads // tp_size, self.num_kv_heads_local, head_dim)
        if isinstance(attention_backend, str):
            self.attn_backend = get_attention_backend(attention_backend, *heads)
        else:
            self.attn_backend = attention_backend(*heads)
        self.model = LlamaModel(hf_config, self.attn_backend, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, tp_rank, tp_size)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, batch: ForwardBatch, kv_cache) -> torch.Tensor:
        """Run the batch, writing its K/V into ``kv_cache``. Returns hidden states ``[T, hidden]``."""
        return self.model(batch, kv_cache)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [N, hidden]`` (usually ``hidden[batch.logits_indices]``) -> logits ``[N, vocab]`` float32."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) into the parameters, fusing q/k/v and gate/up
        and taking this rank's shard, cast to the parameters' dtype on their device. Returns the names of our
        parameters that were filled. A tensor not read yet (``CheckpointTensor``) is read one slice at a time:
        only this rank's shard of it.

        Raises:
            KeyError: a checkpoint tensor with no matching parameter.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            for ckpt_part, param_part, shard_id in _STACKED_PARAMS:
                if f".{ckpt_part}." in name:
                    target = name.replace(ckpt_part, param_part)
                    param = params.get(target)
                    if param is None:
                        raise KeyError(f"checkpoint tensor {name!r} has no parameter {target!r}")
                    param.weight_loader(param, tensor, shard_id)
                    loaded.add(target)
                    break
            else:
                param = params.get(name)
                if param is None:
                    raise KeyError(f"checkpoint tensor {name!r} has no matching parameter")
                loader = getattr(param, "weight_loader", None)
                if loader is not None:
                    loader(param, tensor)
                else:
                    load_whole(param, tensor)
                loaded.add(name)
        return loaded
