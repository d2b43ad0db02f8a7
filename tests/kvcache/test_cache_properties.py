"""Random sequences of allocate / share / register / grow / free / map_ahead / launch / wait / reclaim, checked
against the cache's invariants.

``launch`` stands for a step put on the device over some slots (``record_use``), ``wait`` for the host waiting on
one: until then the machine checks that the step's slots keep their pages and are not handed to a new request, as
the GPU needs. A second cache replays the first one's recorded changes, as a tensor-parallel rank does.

Prefix caching: every request's content is a chain of blocks drawn from a small alphabet (so prompts share
prefixes), each row's value a function of its block's chained key. A request reuses the registered blocks its
chain starts with and writes only after them; it registers its full blocks. Reading every live slot back proves
that no registered page was written or handed out while another slot maps it.
"""

import hashlib

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvcache import KVCacheConfig, NoFreeSlotError, PoolExhaustedError, VirtualKVCache


class CacheMachine(RuleBasedStateMachine):
    """Each live slot holds ``signature + row`` in every row it was grown to, in every layer's K and V."""

    device = "cpu"
    layout = "layer_major"

    @initialize(pool_pages_per_buffer=st.integers(3, 12), prefetch=st.sampled_from([0, 1, 100]))
    def setup(self, pool_pages_per_buffer, prefetch):
        granularity = 64 << 10 if self.device == "cpu" else 2 << 20
        config = KVCacheConfig(
            num_layers=2,
            num_kv_heads=2,
            head_dim=16,
            max_batch_size=4,
            max_seq_len=1,
            device=self.device,
            kv_cache_layout=self.layout,
        )
        self.tpp = granularity // config.buffer_token_bytes
        config.max_seq_len = 4 * self.tpp
        config.kv_cache_memory_bytes = pool_pages_per_buffer * config.num_buffers * granularity
        config.prefetch_tokens = prefetch
        self.cache = VirtualKVCache(config)
        self.cache.record_ops()
        self.replica = VirtualKVCache(config)  # another rank, following the recorded changes
        self.live: dict[int, tuple[int, list[int]]] = {}  # slot -> (tokens written, chained keys of its blocks)
        self.block = self.cache.block_tokens
        self.values: dict[int, float] = {}  # key -> the value its rows start from
        self.in_flight: list[tuple] = []  # (fence, {slot: its page ids when the step was launched})

    def teardown(self):
        if hasattr(self, "cache"):
            self.cache.close()
            self.replica.close()

    def _busy_slots(self) -> set[int]:
        return {slot for fence, pages in self.in_flight if not fence.is_complete() for slot in pages}

    def _chain(self, content: list[int]) -> list[int]:
        keys, previous = [], b""
        for symbol in content:
            previous = hashlib.blake2b(previous + bytes([symbol]), digest_size=8).digest()
            key = int.from_bytes(previous, "little")
            self.values.setdefault(key, 1000.0 * (len(self.values) + 1))
            keys.append(key)
        return keys

    def _expected(self, keys, start, end):
        rows = torch.arange(start, end, dtype=torch.float32)
        base = torch.tensor([self.values[keys[r // self.block]] for r in range(start, end)])
        return (base + rows % self.block).to(self.cache.k[0].device).view(-1, 1, 1)

    def _write(self, slot, start, end, keys):
        values = self._expected(keys, start, end)
        for layer in range(2):
            self.cache.k[layer][slot, start:end] = values
            self.cache.v[layer][slot, start:end] = -values

    @rule(
        num_tokens=st.integers(1, 4 * 1024),
        content=st.lists(st.integers(0, 1), min_size=4, max_size=4),
        share=st.booleans(),
    )
    def allocate(self, num_tokens, content, share):
        num_tokens = min(num_tokens, self.cache.config.max_seq_len)
        keys = self._chain(content)
        cached = self.cache.match_prefix(keys[: (num_tokens - 1) // self.block]) if share else 0
        prefix = keys[:cached]
        before = self.cache.stats()
        can = self.cache.can_allocate(num_tokens, prefix)
        try:
            slot = self.cache.allocate(num_tokens, prefix=prefix)
        except (NoFreeSlotError, PoolExhaustedError):
            assert not can
            assert self.cache.stats() == before
            return
        assert can and slot not in self.live
        assert slot not in self._busy_slots(), "a slot handed out under a step that may still touch it"
        self._write(slot, cached * self.block, num_tokens, keys)
        self.live[slot] = (num_tokens, keys)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def register(self, data):
        slot = data.draw(st.sampled_from(sorted(self.live)))
        written, keys = self.live[slot]
        self.cache.register(slot, keys[: written // self.block])

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.integers(0, 2048))
    def grow(self, data, extra):
        slot = data.draw(st.sampled_from(sorted(self.live)))
        written, keys = self.live[slot]
        target = min(written + extra, self.cache.config.max_seq_len)
        before = self.cache.stats()
        try:
            self.cache.grow(slot, target)
        except PoolExhaustedError:
            assert self.cache.stats() == before
            return
        self._write(slot, written, target, keys)
        self.live[slot] = (target, keys)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.live)))
        self.cache.free(slot)
        del self.live[slot]

    @precondition(lambda self: self.live)
    @rule(step=st.one_of(st.integers(1, 64), st.integers(1, 3 * 1024)))  # within a page, or across pages
    def map_ahead(self, step):
        self.cache.map_ahead({slot: min(n + step, self.cache.config.max_seq_len) for slot, (n, _) in self.live.items()})

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def launch(self, data):
        slots = data.draw(st.sets(st.sampled_from(sorted(self.live)), min_size=1))
        # The step touches each slot's rows up to its tokens; pages mapped ahead beyond them are not its own.
        pages = {
            slot: [buf[: -(-self.live[slot][0] // self.tpp)] for buf in self.cache.slot_page_ids(slot)]
            for slot in slots
        }
        self.in_flight.append((self.cache.record_use(slots), pages))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def wait(self, data):
        fence, _ = data.draw(st.sampled_from(self.in_flight))
        fence.wait()
        self.in_flight = [(f, p) for f, p in self.in_flight if not f.is_complete()]

    @rule()
    def reclaim(self):
        self.cache.reclaim()

    @invariant()
    def no_page_of_a_running_step_is_unmapped(self):
        for fence, launched in self.in_flight:
            if fence.is_complete():
                continue
            for slot, pages in launched.items():
                now = self.cache.slot_page_ids(slot)
                assert all(buf[: len(old)] == old for buf, old in zip(now, pages)), f"slot {slot} lost pages"

    @invariant()
    def replayed_rank_has_the_same_pages(self):
        self.replica.replay(self.cache.take_ops())
        assert self.replica.stats() == self.cache.stats()
        for slot in range(1, 5):
            assert self.replica.slot_page_ids(slot) == self.cache.slot_page_ids(slot)

    @invariant()
    def pages_are_owned_once_and_counted(self):
        stats = self.cache.stats()
        assert stats.free_pages + stats.mapped_pages == stats.total_pages
        assert stats.used_pages + stats.reclaimable_pages == stats.mapped_pages
        if not self.live:
            assert stats.free_pages + stats.reclaimable_pages == stats.total_pages
        # A page is the registry's (mapped in any number of slots, or none) or one slot's own, never both.
        registered = [p for block in self.cache._blocks.values() for buf in block.pages for p in buf]
        assert len(registered) == len(set(registered))
        own = [
            p
            for s in range(1, 5)
            for buf in self.cache.slot_page_ids(s)
            for p in buf[len(self.cache._heads[s]) * self.cache._block_pages :]
        ]
        assert len(own) == len(set(own)) and not set(own) & set(registered)
        assert len(own) + len(registered) == stats.mapped_pages
        heads = {p for s in range(1, 5) for buf in self.cache.slot_page_ids(s) for p in buf} - set(own)
        assert heads <= set(registered)
        # Blocks that an active slot holds are in use; a live request's pages never count as reclaimable.
        held = {id(b) for s in self.live for b in self.cache._heads[s]}
        assert all((b.refs > 0) == (id(b) in held) for b in self.cache._blocks.values())
        assert set(self.cache._evictable) == {key for key, b in self.cache._blocks.items() if not b.refs}
        assert stats.num_active_slots == len(self.live)
        # The reclaimable count kept step by step equals a recount over every slot (both ranks).
        for cache in (self.cache, self.replica):
            recount = [cache._count_excess(s) for s in range(5)]
            assert cache._own_excess == recount and cache._excess_total == sum(recount)
        for slot, (written, _) in self.live.items():
            assert self.cache.capacity_tokens(slot) >= written
            # Each buffer of a slot maps the same number of pages, at the start of the slot's range.
            assert len({len(buf) for buf in self.cache.slot_page_ids(slot)}) == 1

    @invariant()
    def tensors_read_back_what_was_written(self):
        for slot, (written, keys) in self.live.items():
            values = self._expected(keys, 0, written).expand(-1, 2, 16)
            for layer in range(2):
                assert torch.equal(self.cache.k[layer][slot, :written], values)
                assert torch.equal(self.cache.v[layer][slot, :written], -values)


_settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class CpuCacheMachine(CacheMachine):
    device = "cpu"


class CudaCacheMachine(CacheMachine):
    device = "cuda"


class CpuTokenMajorCacheMachine(CacheMachine):
    layout = "token_major"


class CudaTokenMajorCacheMachine(CacheMachine):
    device = "cuda"
    layout = "token_major"


TestCacheProperties = CpuCacheMachine.TestCase
TestCacheProperties.settings = _settings
TestTokenMajorCacheProperties = CpuTokenMajorCacheMachine.TestCase
TestTokenMajorCacheProperties.settings = _settings


@pytest.mark.gpu
class TestCacheOnCuda(CudaCacheMachine.TestCase):
    settings = _settings


@pytest.mark.gpu
class TestTokenMajorCacheOnCuda(CudaTokenMajorCacheMachine.TestCase):
    settings = _settings
