"""The prefix summary a replica reports and the probe a prompt is matched with, over a real host KV cache."""

import pytest

from engine.block_hashes import block_hashes
from engine.prefix_summary import cached_prefix_tokens, prefix_probe, summarize_prefixes, summary_positions
from kvcache import KVCacheConfig, VirtualKVCache

SEED = 12345
MAX_BLOCKS = 8


@pytest.fixture
def cache():
    probe = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, max_batch_size=6, max_seq_len=1, device="cpu")
    block = (64 << 10) // probe.buffer_token_bytes  # tokens per 64 KiB host page, layer-major
    config = KVCacheConfig(
        num_layers=2,
        num_kv_heads=2,
        head_dim=16,
        max_batch_size=6,
        max_seq_len=MAX_BLOCKS * block,
        device="cpu",
        kv_cache_memory_bytes=6 * MAX_BLOCKS * probe.num_buffers * (64 << 10),
    )
    made = VirtualKVCache(config)
    yield made
    made.close()


def cache_prompt(cache: VirtualKVCache, tokens: list[int]) -> int:
    """Gives ``tokens`` a slot (reusing what is cached of them), registers their full blocks, frees the slot."""
    keys = block_hashes(tokens, cache.block_tokens, SEED)
    cached = cache.match_prefix(keys[: (len(tokens) - 1) // cache.block_tokens])
    slot = cache.allocate(len(tokens), prefix=keys[:cached])
    cache.register(slot, keys)
    cache.free(slot)
    return slot


def test_positions_grow_by_about_one_and_a_half():
    assert summary_positions(0) == ()
    assert summary_positions(1) == (0,)
    assert summary_positions(8) == (0, 1, 2, 3, 5, 7)
    assert summary_positions(128)[-4:] == (47, 63, 95, 127)
    positions = summary_positions(100_000)
    assert all(b / a <= 2 for a, b in zip(positions[1:], positions[2:]))


def test_a_cached_prompt_is_found_to_within_the_probe_spacing(cache):
    block = cache.block_tokens
    prompt = list(range(7 * block + 5))  # 7 full blocks
    cache_prompt(cache, prompt)
    summary = summarize_prefixes(cache, SEED, MAX_BLOCKS)
    keys = frozenset(summary.keys)
    assert summary.block_tokens == block and summary.seed == SEED
    # Its own blocks at positions 0, 1, 2, 3, 5: the last probed position (5) gives 6 of its 7 blocks.
    assert cached_prefix_tokens(prefix_probe(prompt, block, SEED), keys) == 6 * block
    # A prompt sharing the first 4 blocks: found 4 blocks deep (positions 0..3).
    shares_four = prompt[: 4 * block] + [99_999] * (3 * block + 1)
    assert cached_prefix_tokens(prefix_probe(shares_four, block, SEED), keys) == 4 * block
    # Another model (seed), or a different first block: nothing.
    assert cached_prefix_tokens(prefix_probe(prompt, block, SEED + 1), keys) == 0
    assert cached_prefix_tokens(prefix_probe([7] + prompt[1:], block, SEED), keys) == 0


def test_the_probe_stops_before_the_block_the_prompt_ends_with():
    # The engine always computes a prompt's last token: a block that ends the prompt is never reused.
    assert prefix_probe(list(range(64)), 32, SEED) == prefix_probe(list(range(33)), 32, SEED)
    assert [n for n, _ in prefix_probe(list(range(65)), 32, SEED)] == [32, 64]
    assert prefix_probe(list(range(32)), 32, SEED) == ()


def test_the_summary_is_bounded_and_keeps_the_most_recent_chains_at_every_position(cache):
    block = cache.block_tokens
    prompts = [[1000 + i] * (4 * block + 1) for i in range(5)]  # 5 chains of 4 blocks, no prefix in common
    for prompt in prompts:
        cache_prompt(cache, prompt)
    full = summarize_prefixes(cache, SEED, MAX_BLOCKS)
    assert len(full.keys) == 5 * 4  # positions 0, 1, 2, 3 of each chain
    small = summarize_prefixes(cache, SEED, MAX_BLOCKS, max_keys=8)
    assert len(small.keys) == 8
    # Taken in turns: the two most recent chains at each of the four positions.
    recent = [block_hashes(p, block, SEED) for p in prompts[-2:]]
    assert set(small.keys) == {keys[i] for keys in recent for i in range(4)}
    oldest = prefix_probe(prompts[0], block, SEED)
    assert cached_prefix_tokens(oldest, frozenset(small.keys)) == 0
    assert cached_prefix_tokens(prefix_probe(prompts[-1], block, SEED), frozenset(small.keys)) == 4 * block


def test_cached_keys_puts_blocks_in_use_first(cache):
    block = cache.block_tokens
    first, second = [1] * (2 * block + 1), [2] * (2 * block + 1)
    cache_prompt(cache, first)
    cache_prompt(cache, second)
    first_keys, second_keys = block_hashes(first, block, SEED), block_hashes(second, block, SEED)
    assert cache.cached_keys(1, (0, 1)) == {0: [second_keys[0]], 1: [second_keys[1]]}  # most recently freed
    slot = cache.allocate(2 * block + 1, prefix=first_keys[:2])  # the first chain in use again
    assert cache.cached_keys(1, (0, 1, 5)) == {0: [first_keys[0]], 1: [first_keys[1]], 5: []}
    cache.free(slot)
