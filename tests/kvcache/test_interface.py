"""The declared KV-cache interface (kvcache/interface.py) and the vAttention cache as its implementation."""

from kvcache import KVCache, KVCacheConfig, VirtualKVCache
from tests.kvcache.kv_cache_contract import check_implements_kv_cache, protocol_members


def test_protocol_declares_what_the_engine_calls():
    assert set(protocol_members()) == {
        "config",
        "k",
        "v",
        "k_flat",
        "v_flat",
        "reserved_slot",
        "max_request_tokens",
        "pages_for_tokens",
        "can_allocate",
        "allocate",
        "grow",
        "free",
        "record_use",
        "map_ahead",
        "wait_idle",
        "stats",
        "close",
        # prefix caching
        "block_tokens",
        "num_cached_blocks",
        "match_prefix",
        "register",
        "head_tokens",
        "cached_keys",
        "num_cached_pages_mapped",
    }


def test_virtual_cache_implements_the_protocol():
    config = KVCacheConfig(
        num_layers=2, num_kv_heads=2, head_dim=64, max_batch_size=2, max_seq_len=1024, kv_cache_memory_bytes=4 << 20
    )
    with VirtualKVCache(config) as cache:
        check_implements_kv_cache(cache)


def test_an_object_missing_a_member_is_not_a_kv_cache():
    class NoMapAhead:
        def __getattr__(self, name):
            if name == "map_ahead":
                raise AttributeError(name)
            return None

    assert not isinstance(NoMapAhead(), KVCache)
