import pytest
import torch

from kvcache import KVCacheConfig, VirtualKVCache

# Every cache test runs on the host backend, and on the CUDA backend where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def make_cache(device):
    """Builds caches whose sizes are given in pages, so tests read the same on 64 KiB and 2 MiB pages."""
    made = []

    def make(
        *,
        num_layers=2,
        max_batch_size=4,
        pages_per_slot=3,
        pool_pages=None,
        prefetch_tokens=0,
        prefetch_pages_per_step=None,
        dtype=torch.float32,
        layout="layer_major",
    ):
        probe = KVCacheConfig(
            num_layers=num_layers,
            num_kv_heads=2,
            head_dim=64,
            max_batch_size=max_batch_size,
            max_seq_len=1,
            dtype=dtype,
            device=device,
            kv_cache_layout=layout,
        )
        granularity = 64 << 10 if device == "cpu" else 2 << 20
        tokens_per_page = granularity // probe.buffer_token_bytes
        if pool_pages is None:
            pool_pages = max_batch_size * pages_per_slot * probe.num_buffers
        config = KVCacheConfig(
            num_layers=num_layers,
            num_kv_heads=2,
            head_dim=64,
            max_batch_size=max_batch_size,
            max_seq_len=pages_per_slot * tokens_per_page,
            dtype=dtype,
            device=device,
            kv_cache_memory_bytes=pool_pages * granularity,
            prefetch_tokens=prefetch_tokens,
            prefetch_pages_per_step=prefetch_pages_per_step,
            kv_cache_layout=layout,
        )
        cache = VirtualKVCache(config)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()
