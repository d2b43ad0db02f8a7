"""bench_served_vs_offline's CPU defaults are a valid engine config (a renamed key once made its CPU command fail at
start, after Ray and the tokenizer had loaded)."""

from benchmarks.bench_served_vs_offline import CPU_ENGINE_KWARGS
from engine.config import EngineConfig


def test_the_cpu_defaults_are_a_valid_engine_config():
    config = EngineConfig.from_dict({"model": "smollm2", "device": "cpu", **CPU_ENGINE_KWARGS})
    assert config.cache.kv_cache_memory_bytes == CPU_ENGINE_KWARGS["kv_cache_memory_bytes"]
    assert config.cache.max_batch_size == CPU_ENGINE_KWARGS["max_batch_size"]
