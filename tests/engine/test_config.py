"""Config validation (ModelConfig, CacheConfig)."""

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig


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
        ({"enforce_eager": "no"}, "enforce_eager"),
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
        ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes"),
        ({"kv_cache_memory_fraction": 1.5}, "kv_cache_memory_fraction"),
        ({"kv_cache_memory_fraction": "half"}, "kv_cache_memory_fraction"),
        ({"prefetch_tokens": -1}, "prefetch_tokens"),
    ],
)
def test_cache_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CacheConfig(**kwargs)


@pytest.mark.parametrize(
    "old,new",
    [
        ("kv_cache_bytes", "kv_cache_memory_bytes"),
        ("pool_size_bytes", "kv_cache_memory_bytes"),
        ("gpu_memory_fraction", "kv_cache_memory_fraction"),
        ("memory_fraction", "kv_cache_memory_fraction"),
        ("kv_layout", "kv_cache_layout"),
    ],
)
def test_an_old_setting_name_fails_naming_the_new_one(old, new):
    with pytest.raises(ValueError, match=rf"{old} \(now {new}\)"):
        EngineConfig.from_dict({"model": "smollm2", old: 1})


def test_cache_defaults_resolve_per_device():
    cfg = CacheConfig()
    assert cfg.resolved_kv_cache_layout(on_gpu=True) == "token_major"
    assert cfg.resolved_kv_cache_layout(on_gpu=False) == "layer_major"
    assert cfg.resolved_prefetch_tokens(on_gpu=True) == 128 and cfg.resolved_prefetch_tokens(on_gpu=False) == 0
    assert cfg.resolved_prefetch_pages_per_step(on_gpu=True) == 128
    assert cfg.resolved_prefetch_pages_per_step(on_gpu=False) is None
    explicit = CacheConfig(kv_cache_layout="layer_major", prefetch_tokens=5, prefetch_pages_per_step=3)
    assert explicit.resolved_kv_cache_layout(on_gpu=True) == "layer_major"
    assert explicit.resolved_prefetch_tokens(on_gpu=True) == 5
    assert explicit.resolved_prefetch_pages_per_step(on_gpu=False) == 3


@pytest.mark.parametrize("value", [0, -1.0, "60", True, float("nan")])
def test_step_timeout_rejects(value):
    with pytest.raises(ValueError, match="step_timeout_s"):
        EngineConfig(step_timeout_s=value)


def test_step_timeout_is_a_top_level_key():
    assert EngineConfig().step_timeout_s == 300.0
    assert EngineConfig.from_dict({"model": "smollm2", "step_timeout_s": 2}).step_timeout_s == 2
    assert EngineConfig.from_dict({"step_timeout_s": None}).step_timeout_s is None
