import subprocess
import sys
import textwrap

import pytest
import torch

from kvcache import (
    CacheDesyncError,
    CacheOp,
    KVCacheConfig,
    KVCacheError,
    NoFreeSlotError,
    PoolExhaustedError,
    SequenceTooLongError,
    VirtualKVCache,
)
from kvcache.config import MAX_AUTO_BATCH_SLOTS


def fill(cache, slot, start, end, value):
    """Writes ``value + token index`` into rows ``[start, end)`` of ``slot`` in every layer's K and V."""
    rows = torch.arange(start, end, dtype=torch.float32, device=cache.k[0].device).view(-1, 1, 1)
    for layer in range(cache.config.num_layers):
        cache.k[layer][slot, start:end] = value + rows
        cache.v[layer][slot, start:end] = -(value + rows)


def check(cache, slot, end, value):
    rows = torch.arange(0, end, dtype=torch.float32, device=cache.k[0].device).view(-1, 1, 1)
    for layer in range(cache.config.num_layers):
        assert torch.equal(cache.k[layer][slot, :end], (value + rows).expand(-1, 2, 64))
        assert torch.equal(cache.v[layer][slot, :end], -(value + rows).expand(-1, 2, 64))


def assert_accounting(cache):
    stats = cache.stats()
    assert stats.free_pages + stats.mapped_pages == stats.total_pages
    assert stats.used_pages + stats.reclaimable_pages == stats.mapped_pages
    ids = [p for s in range(1, cache.config.max_batch_size + 1) for buf in cache.slot_page_ids(s) for p in buf]
    assert len(ids) == len(set(ids)) == stats.mapped_pages
    reserved = {p for buf in cache.slot_page_ids(cache.reserved_slot) for p in buf}
    assert len(reserved) == cache.num_buffers and reserved.isdisjoint(ids)
    assert all(0 <= p < stats.total_pages + len(reserved) for p in ids)


def test_tensors_have_the_configured_shape_and_dtype(make_cache):
    cache = make_cache(num_layers=3, dtype=torch.bfloat16)
    tpp = int(cache.tokens_per_page)
    assert len(cache.k) == len(cache.v) == 3
    # Slot 0 is the reserved slot, then the 4 request slots.
    assert cache.k[0].shape == (5, 3 * tpp, 2, 64) and cache.k[0].dtype == torch.bfloat16
    assert cache.k_flat[0].shape == (5 * cache.slot_stride_tokens, 2, 64)
    assert cache.stats().mapped_pages == 0  # nothing is backed at start-up for requests


def test_data_survives_growth_of_other_slots(make_cache):
    cache = make_cache()
    tpp = int(cache.tokens_per_page)
    a = cache.allocate(tpp // 2)
    fill(cache, a, 0, tpp // 2, 1000.0)
    b = cache.allocate(1)
    for length in (tpp, 2 * tpp, 3 * tpp):
        cache.grow(b, length)
        fill(cache, b, 0, length, 5000.0)
        check(cache, a, tpp // 2, 1000.0)
    cache.grow(a, 3 * tpp)
    fill(cache, a, tpp // 2, 3 * tpp, 1000.0)
    check(cache, a, 3 * tpp, 1000.0)
    check(cache, b, 3 * tpp, 5000.0)
    assert_accounting(cache)


def test_flat_view_aliases_the_dense_view(make_cache):
    cache = make_cache()
    slot = cache.allocate(10)
    cache.k_flat[1][slot * cache.slot_stride_tokens + 7] = 42.0
    assert torch.all(cache.k[1][slot, 7] == 42.0)


def test_slots_never_alias(make_cache):
    cache = make_cache(max_batch_size=4)
    tpp = int(cache.tokens_per_page)
    slots = [cache.allocate(2 * tpp + 1) for _ in range(4)]
    assert sorted(slots) == [1, 2, 3, 4]  # never the reserved slot 0
    for i, slot in enumerate(slots):
        fill(cache, slot, 0, 2 * tpp + 1, 10000.0 * (i + 1))
    for i, slot in enumerate(slots):
        check(cache, slot, 2 * tpp + 1, 10000.0 * (i + 1))
    pages = [set(p for buf in cache.slot_page_ids(s) for p in buf) for s in slots]
    assert all(pages[i].isdisjoint(pages[j]) for i in range(4) for j in range(i + 1, 4))
    with pytest.raises(NoFreeSlotError):
        cache.allocate(1)


def test_freed_slot_is_reused_best_fit_with_its_pages(make_cache):
    cache = make_cache(max_batch_size=3)
    tpp = int(cache.tokens_per_page)
    small = cache.allocate(tpp)  # 1 page per buffer
    large = cache.allocate(3 * tpp)  # 3 pages per buffer
    fill(cache, large, 0, 3 * tpp, 7.0)
    large_pages = cache.slot_page_ids(large)
    cache.free(small)
    cache.free(large)
    free_before = cache.stats().free_pages
    again = cache.allocate(2 * tpp + 3)  # fits only in the large slot's pages
    assert again == large
    assert cache.slot_page_ids(again) == large_pages
    assert cache.stats().free_pages == free_before  # no new mapping: deferred reclamation paid off
    check(cache, again, 2 * tpp, 7.0)  # the old pages are really the same memory
    other = cache.allocate(tpp)
    assert other == small  # best fit: the one-page slot, not the empty one
    assert_accounting(cache)


def test_pool_exhausted_leaves_state_untouched(make_cache):
    cache = make_cache(max_batch_size=4, pages_per_slot=4, pool_pages=2 * 2 * 3)  # 3 pages per buffer in all
    tpp = int(cache.tokens_per_page)
    a = cache.allocate(2 * tpp)
    before = cache.stats()
    with pytest.raises(PoolExhaustedError) as info:
        cache.allocate(2 * tpp)
    assert info.value.pages_needed == 2 * 2 * 2 and info.value.pages_available == 2 * 2
    with pytest.raises(PoolExhaustedError):
        cache.grow(a, 3 * tpp + 1)
    assert cache.stats() == before
    assert cache.can_allocate(tpp) and not cache.can_allocate(tpp + 1)
    cache.grow(a, 3 * tpp)
    assert cache.stats().free_pages == 0
    assert not cache.can_allocate(1)
    assert_accounting(cache)


def test_reclamation_under_pressure(make_cache):
    cache = make_cache(max_batch_size=4, pool_pages=2 * 2 * 4)  # 4 pages per buffer in all
    tpp = int(cache.tokens_per_page)
    a = cache.allocate(2 * tpp)
    b = cache.allocate(2 * tpp)
    fill(cache, a, 0, 2 * tpp, 1.0)
    cache.free(a)
    cache.free(b)
    stats = cache.stats()
    assert stats.free_pages == 0 and stats.reclaimable_pages == stats.total_pages and stats.used_pages == 0
    c = cache.allocate(3 * tpp)  # takes one free slot's pages and reclaims one page per buffer of the other
    assert c in (a, b)
    other = b if c == a else a
    assert len(cache.slot_page_ids(other)[0]) == 1
    fill(cache, c, 0, 3 * tpp, 9.0)
    check(cache, c, 3 * tpp, 9.0)
    d = cache.allocate(tpp)
    assert d == other
    assert cache.stats().free_pages == 0 and cache.stats().reclaimable_pages == 0
    assert_accounting(cache)


def test_max_request_tokens_is_bounded_by_the_pool(make_cache):
    roomy = make_cache(pages_per_slot=3)
    assert roomy.max_request_tokens == roomy.config.max_seq_len
    tight = make_cache(pages_per_slot=3, pool_pages=2 * 2 * 2)  # two pages per buffer in the whole pool
    assert tight.max_request_tokens == 2 * int(tight.tokens_per_page)
    assert tight.can_allocate(tight.max_request_tokens) and not tight.can_allocate(tight.max_request_tokens + 1)


def test_reclaim_unmaps_only_what_no_request_uses(make_cache):
    cache = make_cache(max_batch_size=3, prefetch_tokens=1)
    tpp = int(cache.tokens_per_page)
    a, b = cache.allocate(2 * tpp), cache.allocate(tpp)
    fill(cache, b, 0, tpp, 3.0)
    cache.map_ahead({b: tpp})  # one page per buffer mapped ahead for b
    cache.free(a)
    assert cache.reclaim() == (2 + 1) * 2 * 2
    stats = cache.stats()
    assert stats.reclaimable_pages == 0 and stats.mapped_pages == stats.used_pages == 2 * 2
    check(cache, b, tpp, 3.0)
    assert_accounting(cache)


def test_prepare_maps_ahead_best_effort(make_cache):
    cache = make_cache(max_batch_size=2, pages_per_slot=5, pool_pages=2 * 2 * 4, prefetch_tokens=1)
    tpp = int(cache.tokens_per_page)
    a = cache.allocate(tpp)  # exactly one page per buffer
    assert cache.map_ahead({a: tpp}) == 2 * 2  # the prefetched token needs a second page
    assert cache.stats().reclaimable_pages == 2 * 2  # mapped ahead, not yet used
    free = cache.stats().free_pages
    cache.grow(a, tpp + 1)
    assert cache.stats().free_pages == free  # the step that needs it finds it mapped
    # Asking for far more than the pool maps what fits and raises nothing.
    assert cache.map_ahead({a: 5 * tpp}) == 2 * 2 * 2
    assert cache.stats().free_pages == 0
    assert_accounting(cache)


def test_prefetch_is_paced_nearest_first_and_leaves_half_the_free_pages(make_cache):
    """Slots decoding in lockstep towards a page boundary: each map_ahead maps at most the step's page budget,
    for the slot nearest to its boundary first, and the next step's own need is never held back by the budget."""
    cache = make_cache(
        max_batch_size=4, pages_per_slot=3, pool_pages=4 * 3 * 4, prefetch_tokens=8, prefetch_pages_per_step=2 * 2
    )  # one page in each of the 4 buffers: one slot a step
    tpp = int(cache.tokens_per_page)
    slots = [cache.allocate(tpp - 4 + i) for i in range(4)]  # 4, 3, 2, 1 tokens before their boundary
    lengths = {s: tpp - 4 + i for i, s in enumerate(slots)}
    # 4 tokens ahead is half the window: that slot is not due yet, the others are.
    assert cache.map_ahead({slots[0]: lengths[slots[0]]}) == 0
    assert cache.map_ahead(lengths) == 2 * 2
    assert [cache.capacity_tokens(s) for s in slots] == [tpp, tpp, tpp, 2 * tpp]  # the nearest one
    assert cache.map_ahead(lengths) == 2 * 2
    assert cache.capacity_tokens(slots[2]) == 2 * tpp
    # The need of the next step is mapped whatever the budget: three slots cross at once.
    assert cache.map_ahead({s: max(n, tpp + 1) for s, n in lengths.items()}) == 2 * 2 * 2
    assert all(cache.capacity_tokens(s) == 2 * tpp for s in slots)
    assert_accounting(cache)

    # Without a budget, prefetch still takes at most half of the free pages (the rest is for growth).
    tight = make_cache(max_batch_size=4, pages_per_slot=3, pool_pages=4 * 4 * 2, prefetch_tokens=8)
    near = [tight.allocate(tpp - 3) for _ in range(4)]  # 16 pages left; 4 slots want one more page per buffer
    assert tight.map_ahead({s: tpp - 3 for s in near}) == 2 * 2 * 2
    assert tight.stats().free_pages == 8
    assert_accounting(tight)


def test_prefetch_tops_a_slot_up_to_the_window_once_half_of_it_is_used(make_cache):
    """Hysteresis: a slot decoding token by token gets its pages several at a time (one driver run per top-up), not
    one page each time the window slides past a page boundary; what is mapped ahead stays within the window."""
    tpp = int(make_cache(max_batch_size=1).tokens_per_page)
    window = 4 * tpp
    cache = make_cache(max_batch_size=2, pages_per_slot=12, pool_pages=2 * 2 * 12, prefetch_tokens=window)
    slot = cache.allocate(1)
    calls = []
    for n in range(1, 8 * tpp):
        cache.grow(slot, n)
        if cache.map_ahead({slot: n}):
            calls.append((n, cache.capacity_tokens(slot)))
        assert n <= cache.capacity_tokens(slot) <= n + window + tpp  # never more than the window (rounded up) ahead
    # After the first top-up, a call comes only once half the window is used, and maps about half of it.
    gaps = [b[0] - a[0] for a, b in zip(calls, calls[1:])]
    assert gaps and all(g >= 2 * tpp - 1 for g in gaps), calls
    assert len(calls) <= 8 * tpp // (2 * tpp) + 1
    assert_accounting(cache)


def test_map_ahead_evicts_cached_blocks_but_never_waits_for_a_step(make_cache, device):
    """With no free page left, the next step's need comes from cached blocks no request holds, least recently
    released first (grow would evict them a moment later, on the step's critical path); never from a block that a
    step still in flight may read, for map_ahead does not wait for the device."""
    cache = make_cache(max_batch_size=2, pool_pages=2 * 2 * 3)  # 3 pages in each of the 4 buffers
    tpp = int(cache.tokens_per_page)
    a = cache.allocate(2 * tpp)
    assert cache.register(a, [11, 12]) == 2  # two cached blocks of one page per buffer
    if device == "cuda":
        torch.cuda._sleep(2_000_000_000)  # a long kernel queued before the fence: the step is still running
    fence = cache.record_use([a])
    cache.free(a)
    b = cache.allocate(tpp)
    assert b != a and cache.stats().free_pages == 0
    assert cache.map_ahead({b: tpp + 1}) == 0 and cache.num_evicted_blocks == 0
    assert not fence.is_complete()
    fence.wait()
    assert cache.map_ahead({b: tpp + 1}) == 2 * 2 and cache.num_evicted_blocks == 1
    assert cache.match_prefix([11, 12]) == 1  # the deeper block went first
    free = cache.stats().free_pages
    cache.grow(b, tpp + 1)
    assert cache.stats().free_pages == free  # the step finds its page mapped
    assert_accounting(cache)


def test_a_cached_prefix_is_mapped_in_one_call_per_buffer(make_cache):
    """A prefix of several blocks is mapped into the new slot in one call per buffer (its pages, consecutive where
    the first slot grew through them, are then one run: one access-setting driver call on CUDA), and reads back."""
    cache = make_cache(max_batch_size=2, pages_per_slot=4)
    tpp = int(cache.tokens_per_page)
    a = cache.allocate(3 * tpp)
    fill(cache, a, 0, 3 * tpp, 5.0)
    assert cache.register(a, [1, 2, 3]) == 3
    calls = []
    memory_map = cache._memory.map
    cache._memory.map = lambda address, page_ids: (calls.append(list(page_ids)), memory_map(address, page_ids))
    b = cache.allocate(3 * tpp + 1, prefix=[1, 2, 3])
    assert len(calls) == 2 * cache.num_buffers  # the three blocks, then the request's own page
    assert cache.slot_page_ids(b) == [
        buf + [own[0]] for buf, own in zip(cache.slot_page_ids(a), calls[-cache.num_buffers :])
    ]
    check(cache, b, 3 * tpp, 5.0)
    assert cache.stats().mapped_pages == 4 * cache.num_buffers  # the shared pages count once


def test_a_full_pool_hands_a_freed_slots_cached_pages_to_the_next_request_in_place(make_cache):
    """vAttention's reuse of a freed slot's pages, kept under prefix caching: where free pages cannot hold what a
    new request will grow to (cached blocks are about to be evicted anyway), the slot's own cached blocks are
    evicted in place and their pages become the new request's, with no page unmapped or mapped. With room in the
    pool, the blocks stay cached and the request maps fresh pages elsewhere."""
    cache = make_cache(max_batch_size=2, pool_pages=2 * 2 * 3)  # 3 pages per buffer: one full slot
    tpp = int(cache.tokens_per_page)
    a = cache.allocate(3 * tpp)
    assert cache.register(a, [1, 2, 3]) == 3
    pages = cache.slot_page_ids(a)
    cache.record_use([a]).wait()
    cache.free(a)
    b = cache.allocate(tpp, final_tokens=3 * tpp)
    assert b == a and cache.slot_page_ids(b) == pages  # the same pages, nothing remapped
    assert cache.num_cached_blocks == 0 and cache.num_evicted_blocks == 3
    assert cache.stats().free_pages == 0 and cache.stats().reclaimable_pages == 2 * 2 * 2  # its 2 pages to come
    fill(cache, b, 0, 3 * tpp, 7.0)
    check(cache, b, 3 * tpp, 7.0)
    assert_accounting(cache)

    roomy = make_cache(max_batch_size=2, pool_pages=2 * 2 * 6)
    a = roomy.allocate(3 * tpp)
    assert roomy.register(a, [1, 2, 3]) == 3
    roomy.record_use([a]).wait()
    roomy.free(a)
    b = roomy.allocate(tpp, final_tokens=3 * tpp)
    assert b != a and roomy.match_prefix([1, 2, 3]) == 3 and roomy.num_evicted_blocks == 0
    assert_accounting(roomy)


def test_cached_blocks_are_evicted_only_when_spare_pages_fall_short(make_cache, device):
    """Reclaim order: slots' own spare pages before any cached block, whether a request is admitted (a free slot's
    plain pages are taken rather than another's cached blocks adopted) or map_ahead maps ahead (it leaves to grow
    the pages of a free slot still in flight, rather than evicting)."""
    cache = make_cache(max_batch_size=3, pages_per_slot=5, pool_pages=2 * 2 * 5)
    tpp = int(cache.tokens_per_page)
    a = cache.allocate(2 * tpp)
    assert cache.register(a, [11, 12]) == 2
    b = cache.allocate(3 * tpp)  # plain pages
    cache.record_use([a, b]).wait()
    cache.free(b)
    cache.free(a)
    assert cache.allocate(2 * tpp) == b and cache.match_prefix([11, 12]) == 2 and cache.num_evicted_blocks == 0

    cache = make_cache(max_batch_size=3, pool_pages=2 * 2 * 4)
    c = cache.allocate(tpp)
    assert cache.register(c, [7]) == 1
    cache.record_use([c]).wait()
    cache.free(c)
    d, x = cache.allocate(tpp), cache.allocate(2 * tpp)  # the pool is full
    if device == "cuda":
        torch.cuda._sleep(2_000_000_000)
    fence = cache.record_use([d, x])
    cache.free(x)  # its step still runs
    assert cache.map_ahead({d: tpp + 1}) == 0 and cache.match_prefix([7]) == 1
    fence.wait()
    cache.grow(d, tpp + 1)  # takes a page of x
    assert cache.match_prefix([7]) == 1 and cache.num_evicted_blocks == 0
    assert_accounting(cache)


def test_token_major_layout_puts_every_layer_of_a_token_in_one_page(make_cache):
    """One buffer for the whole cache: a page holds 2 * L * H * D elements per token, the per-layer views are strided
    windows of it that never overlap, and a request maps pages for its tokens only (at most one page beyond)."""
    cache = make_cache(num_layers=3, layout="token_major", pages_per_slot=4)
    row = 3 * 2 * 2 * 64  # elements of one token: 3 layers x K/V x 2 heads x 64
    assert cache.num_buffers == 1 and cache.tokens_per_page == cache.page_size_bytes / (row * 4)
    assert cache.k_flat[0].stride() == (row, 64, 1) and cache.k[2].stride()[1] == row
    tpp = int(cache.tokens_per_page)
    a, b = cache.allocate(tpp + 1), cache.allocate(3)
    assert cache.stats().mapped_pages == 2 + 1
    fill(cache, a, 0, tpp + 1, 100.0)
    fill(cache, b, 0, 3, 5000.0)
    # Each layer's K and V land in their own place within the token's row.
    base = cache.k_flat[0]
    for layer in range(3):
        assert cache.k_flat[layer].data_ptr() - base.data_ptr() == 2 * layer * 2 * 64 * 4
        assert cache.v_flat[layer].data_ptr() - base.data_ptr() == (2 * layer + 1) * 2 * 64 * 4
    check(cache, a, tpp + 1, 100.0)
    check(cache, b, 3, 5000.0)
    cache.grow(b, 2 * tpp)
    fill(cache, b, 3, 2 * tpp, 5003.0 - 3)
    check(cache, a, tpp + 1, 100.0)
    assert_accounting(cache)


def test_errors(make_cache):
    cache = make_cache(max_batch_size=1)
    with pytest.raises(SequenceTooLongError):
        cache.allocate(cache.config.max_seq_len + 1)
    slot = cache.allocate(1)
    with pytest.raises(SequenceTooLongError):
        cache.grow(slot, cache.config.max_seq_len + 1)
    with pytest.raises(NoFreeSlotError):
        cache.allocate(1)
    cache.free(slot)
    with pytest.raises(KVCacheError):
        cache.free(slot)
    with pytest.raises(KVCacheError):
        cache.grow(slot, 5)
    assert issubclass(PoolExhaustedError, KVCacheError)


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_layers", 0),
        ("num_kv_heads", -1),
        ("head_dim", 1.5),
        ("max_batch_size", 0),
        ("max_seq_len", 0),
        ("dtype", "int8"),
        ("device", "tpu"),
        ("page_size_bytes", 1000),
        ("kv_cache_memory_bytes", 0),
        ("kv_cache_memory_fraction", 1.5),
        ("prefetch_tokens", -1),
    ],
)
def test_bad_config_names_the_field(field, value):
    kwargs = dict(num_layers=2, num_kv_heads=2, head_dim=64, max_batch_size=2, max_seq_len=16)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field if field != "dtype" else "dtype"):
        KVCacheConfig(**kwargs)


@pytest.mark.parametrize("layout", ["layer_major", "token_major"])
def test_batch_slots_are_sized_from_the_pool_when_not_given(make_cache, layout):
    """Without ``max_batch_size`` the cache gives itself a slot for every request its pool holds at a page per
    buffer, at most 1024; every one of those slots can take a request, and the pool holds exactly its budget."""
    buffers = 2 * 2 if layout == "layer_major" else 1
    cache = make_cache(max_batch_size=None, pool_pages=5 * buffers, layout=layout)
    assert cache.config.max_batch_size == 5
    stats = cache.stats()
    assert stats.total_pages == 5 * buffers and stats.num_free_slots == 5
    slots = [cache.allocate(1) for _ in range(5)]
    assert sorted(slots) == [1, 2, 3, 4, 5]
    with pytest.raises(NoFreeSlotError):
        cache.allocate(1)
    for slot in slots:
        cache.free(slot)
    many = make_cache(max_batch_size=None, pool_pages=1100 * buffers, layout=layout)
    assert many.config.max_batch_size == MAX_AUTO_BATCH_SLOTS == 1024
    slot = many.allocate(1)
    fill(many, slot, 0, 1, 3.0)
    check(many, slot, 1, 3.0)
    assert many.k[0].shape[0] == 1024 + 1  # the reserved slot first


def test_pool_too_small_for_one_request_is_a_config_error(device):
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        VirtualKVCache(
            KVCacheConfig(
                num_layers=4,
                num_kv_heads=2,
                head_dim=64,
                max_batch_size=2,
                max_seq_len=16,
                device=device,
                kv_cache_memory_bytes=1,
            )
        )


def test_close_unmaps_everything(make_cache, device):
    """After close the pool's physical memory is gone: no mapping of its file on the host; on CUDA the device's
    free memory is back to what it was before the cache took it."""
    if device != "cpu":
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info(device)[0]
    cache = make_cache()
    pool_bytes = cache.stats().total_pages * cache.page_size_bytes
    cache.allocate(int(cache.tokens_per_page) * 2)
    if device == "cpu":
        with open("/proc/self/maps") as f:
            assert "vattention-kv-pool" in f.read()
    else:
        assert torch.cuda.mem_get_info(device)[0] <= free_before - pool_bytes
    cache.close()
    cache.close()  # idempotent
    assert cache.k == []
    with pytest.raises(KVCacheError):
        cache.allocate(1)
    if device == "cpu":
        with open("/proc/self/maps") as f:
            assert "vattention-kv-pool" not in f.read()
    else:
        # Other allocations of this process may come and go by a granule or two; the pool is far larger.
        assert torch.cuda.mem_get_info(device)[0] >= free_before - pool_bytes // 4


def test_teardown_at_exit_with_the_cache_alive(device):
    """A cache still referenced when the interpreter exits: exit hooks registered after it still read its memory,
    and it is torn down at exit (its memory released), with a clean exit status."""
    script = textwrap.dedent(f"""
        import atexit

        state = {{}}

        def after_teardown():  # registered before any weakref.finalize exists: runs after their exit hook
            print("finalizer-alive-at-the-end", state["finalizer"].alive)
            if {device!r} == "cpu":
                with open("/proc/self/maps") as maps:
                    print("pool-mapped-at-the-end", "vattention-kv-pool" in maps.read())

        atexit.register(after_teardown)

        import torch
        from kvcache import KVCacheConfig, VirtualKVCache

        cache = VirtualKVCache(KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, max_batch_size=2,
                                             max_seq_len=4096, device={device!r}, kv_cache_memory_bytes=64 << 20))
        slot = cache.allocate(3000)
        cache.k[0][slot, :3000] = 1.0
        state["finalizer"] = cache._finalizer

        def before_teardown():  # registered last: runs first, while the cache must still be usable
            print("value-at-exit", float(cache.k[0][slot, 2999].sum()))

        atexit.register(before_teardown)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "value-at-exit 128.0" in out.stdout, out.stdout
    assert "finalizer-alive-at-the-end False" in out.stdout, out.stdout
    if device == "cpu":
        assert "pool-mapped-at-the-end False" in out.stdout, out.stdout


def test_replayed_changes_give_identical_slots_and_pages(make_cache):
    """Tensor parallelism: rank 0 records its changes, another rank replays them and holds the same pages."""
    rank0, rank1 = (make_cache(pages_per_slot=4, pool_pages=2 * 2 * 5, prefetch_tokens=1) for _ in range(2))
    tpp = int(rank0.tokens_per_page)
    rank0.record_ops()
    a = rank0.allocate(tpp + 1)
    b = rank0.allocate(10)
    rank0.grow(a, 2 * tpp + 1)
    rank0.record_use([a, b])  # a step in flight over both
    rank0.free(b)
    rank0.map_ahead({a: 3 * tpp})
    with pytest.raises(PoolExhaustedError):  # failed calls change nothing and are not recorded
        rank0.allocate(4 * tpp)
    c = rank0.allocate(tpp)
    ops = rank0.take_ops()
    assert {op.kind for op in ops} == {"activate", "map", "tokens", "free"} and rank0.take_ops() == []
    rank1.replay(ops)
    for slot in (a, b, c):
        assert rank1.slot_page_ids(slot) == rank0.slot_page_ids(slot)
    assert rank1.stats() == rank0.stats()


def test_replay_detects_a_diverged_cache(make_cache):
    rank0, rank1 = make_cache(), make_cache()
    rank0.record_ops()
    rank1.allocate(10)  # rank 1 holds a slot rank 0 does not know of
    rank0.allocate(10)
    with pytest.raises(CacheDesyncError, match="already active"):
        rank1.replay(rank0.take_ops())
    with pytest.raises(CacheDesyncError, match="not active"):
        rank1.replay([CacheOp("tokens", 3, 10)])


def test_a_freed_slot_keeps_its_pages_until_the_step_that_used_it_is_done(make_cache, device):
    cache = make_cache(max_batch_size=2, pool_pages=2 * 2 * 3)
    tpp = int(cache.tokens_per_page)
    a = cache.allocate(2 * tpp)
    if device == "cuda":
        torch.cuda._sleep(2_000_000_000)  # a long kernel queued before the fence: the step is still running
    fence = cache.record_use([a])  # a step on the device reads and writes a
    pages = cache.slot_page_ids(a)
    cache.free(a)
    assert cache.stats().reclaimable_pages == 2 * 2 * 2  # counted as reclaimable at once...
    assert cache.map_ahead({}) == 0 and cache.slot_page_ids(a) == pages
    assert not cache.can_allocate(1) or cache.allocate(1) != a  # ...but the slot goes to no one
    assert cache.slot_page_ids(a) == pages and not fence.is_complete()
    b = next(s for s in range(1, 3) if cache.is_active(s))
    cache.grow(b, 2 * tpp)  # needs a's pages: the cache waits for the step, then reclaims
    assert fence.is_complete() and cache.slot_page_ids(a)[0] == [pages[0][0]]
    assert_accounting(cache)


def test_the_reserved_slot_keeps_every_view_based_on_mapped_memory(make_cache):
    cache = make_cache(max_batch_size=2)
    a = cache.allocate(int(cache.tokens_per_page) * 3)
    cache.free(a)
    cache.reclaim()
    stats = cache.stats()
    assert stats.mapped_pages == 0 and stats.free_pages == stats.total_pages
    assert all(len(buf) == 1 for buf in cache.slot_page_ids(cache.reserved_slot))
    for view in cache.k_flat + cache.v_flat:
        view[0] = 1.0  # the first row of every view is backed (on CUDA, Triton's launch check reads its base)
        assert float(view[0].sum()) == view[0].numel()
    with pytest.raises(KVCacheError):
        cache.free(cache.reserved_slot)


def test_close_waits_for_the_last_step(make_cache):
    cache = make_cache()
    fence = cache.record_use([cache.allocate(1)])
    cache.close()
    assert fence.is_complete()


@pytest.mark.gpu
def test_llama3_8b_shape_reserves_1024_slots_of_8k_tokens_on_cuda():
    """The default on an H100-class GPU: 1024 slots of Llama-3-8B's 8K context (1 TiB of virtual addresses,
    token-major), every slot usable at once, the last slot's rows as readable as the first's."""
    cache = VirtualKVCache(
        KVCacheConfig(
            num_layers=32,
            num_kv_heads=8,
            head_dim=128,
            max_batch_size=None,
            max_seq_len=8192,
            dtype=torch.bfloat16,
            device="cuda",
            kv_cache_memory_bytes=1100 * (2 << 20),
            kv_cache_layout="token_major",
        )
    )
    try:
        assert cache.config.max_batch_size == MAX_AUTO_BATCH_SLOTS
        slots = [cache.allocate(1) for _ in range(MAX_AUTO_BATCH_SLOTS)]
        assert sorted(slots) == list(range(1, MAX_AUTO_BATCH_SLOTS + 1))
        for layer in (0, 31):
            for slot in (1, 512, MAX_AUTO_BATCH_SLOTS):
                cache.k[layer][slot, 0] = float(slot % 97 + layer)
                cache.v[layer][slot, 0] = -float(slot % 89 + layer)
        torch.cuda.synchronize()
        for layer in (0, 31):
            for slot in (1, 512, MAX_AUTO_BATCH_SLOTS):
                assert torch.all(cache.k[layer][slot, 0] == float(slot % 97 + layer))
                assert torch.all(cache.v[layer][slot, 0] == -float(slot % 89 + layer))
        for slot in slots:
            cache.free(slot)
    finally:
        cache.close()


def test_a_replayed_unmap_waits_for_this_ranks_own_step_over_the_slot(make_cache, device):
    """A tensor-parallel worker never waits for its forwards: replaying rank 0's unmap of a freed slot waits for the
    worker's own last step over that slot (its fence), as rank 0 waited for its own."""
    rank0, rank1 = (make_cache(max_batch_size=2, pool_pages=2 * 2 * 3) for _ in range(2))
    tpp = int(rank0.tokens_per_page)
    rank0.record_ops()
    a = rank0.allocate(2 * tpp)
    c = rank0.allocate(tpp)
    rank1.replay(rank0.take_ops())
    rank0.record_use([a, c]).wait()  # rank 0's step over a and c is done
    if device == "cuda":
        torch.cuda._sleep(500_000_000)  # rank 1's is still running
    fence = rank1.record_use([a, c])
    rank0.free(a)
    rank0.grow(c, 3 * tpp)  # the pool is empty: a's idle pages are taken back for c
    ops = rank0.take_ops()
    assert "unmap" in {op.kind for op in ops}, ops
    assert not fence.is_complete()
    rank1.replay(ops)
    assert fence.is_complete()
    assert rank1.stats() == rank0.stats()
