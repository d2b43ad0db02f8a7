"""Config validation (ModelConfig, CacheConfig)."""

import pytest
import torch

from engine.config import CacheConfig, ModelConfig


def test_defaults_resolve_on_cpu():
    cfg = ModelConfig(device="cpu")
    assert cfg.model == "smollm2"
    assert cfg.resolved_dtype() == torch.float32
    assert cfg.resolved_attention_backend() == "sdpa"
    assert ModelConfig(device="cuda").resolved_dtype() == torch.bfloat16
    assert ModelConfig(device="cpu", dtype="bfloat16").resolved_dtype() == torch.bfloat16
    assert ModelConfig(device="cuda", dtype="float32").resolved_attention_backend() == "sdpa"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"model": ""}, "model"),
        ({"dtype": "float64"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"attention_backend": "paged"}, "attention_backend"),
        ({"seed": -1}, "seed"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ],
)
def test_model_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": True}, "max_batch_size"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"page_size_bytes": 100}, "page_size_bytes"),
        ({"kv_cache_bytes": 0}, "kv_cache_bytes"),
        ({"gpu_memory_fraction": 1.5}, "gpu_memory_fraction"),
        ({"gpu_memory_fraction": "half"}, "gpu_memory_fraction"),
        ({"prefetch_tokens": -1}, "prefetch_tokens"),
    ],
)
def test_cache_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CacheConfig(**kwargs)
