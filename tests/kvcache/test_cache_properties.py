"""Random sequences of allocate / grow / free / map_ahead / launch / wait, checked against the cache's invariants.

``launch`` stands for a step put on the device over some slots (``record_use``), ``wait`` for the host waiting on
one: until then the machine checks that the step's slots keep their pages and are not handed to a new request, as
the GPU needs. A second cache replays the first one's recorded changes, as a tensor-parallel rank does.
"""

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
        self.live: dict[int, tuple[int, float]] = {}  # slot -> (tokens written, signature)
        self.next_signature = 1.0
        self.in_flight: list[tuple] = []  # (fence, {slot: its page ids when the step was launched})

    def teardown(self):
        if hasattr(self, "cache"):
            self.cache.close()
            self.replica.close()

    def _busy_slots(self) -> set[int]:
        return {slot for fence, pages in self.in_flight if not fence.is_complete() for slot in pages}

    def _write(self, slot, start, end, signature):
        rows = torch.arange(start, end, dtype=torch.float32, device=self.cache.k[0].device).view(-1, 1, 1)
        for layer in range(2):
            self.cache.k[layer][slot, start:end] = signature + rows
            self.cache.v[layer][slot, start:end] = signature - rows

    @rule(num_tokens=st.integers(1, 4 * 1024))
    def allocate(self, num_tokens):
        num_tokens = min(num_tokens, self.cache.config.max_seq_len)
        before = self.cache.stats()
        can = self.cache.can_allocate(num_tokens)
        try:
            slot = self.cache.allocate(num_tokens)
        except (NoFreeSlotError, PoolExhaustedError):
            assert not can
            assert self.cache.stats() == before
            return
        assert can and slot not in self.live
        assert slot not in self._busy_slots(), "a slot handed out under a step that may still touch it"
        signature, self.next_signature = self.next_signature * 1000.0, self.next_signature + 1
        self._write(slot, 0, num_tokens, signature)
        self.live[slot] = (num_tokens, signature)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.integers(0, 2048))
    def grow(self, data, extra):
        slot = data.draw(st.sampled_from(sorted(self.live)))
        written, signature = self.live[slot]
        target = min(written + extra, self.cache.config.max_seq_len)
        before = self.cache.stats()
        try:
            self.cache.grow(slot, target)
        except PoolExhaustedError:
            assert self.cache.stats() == before
            return
        self._write(slot, written, target, signature)
        self.live[slot] = (target, signature)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.live)))
        self.cache.free(slot)
        del self.live[slot]

    @precondition(lambda self: self.live)
    @rule(step=st.integers(1, 64))
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
        owned = [p for s in range(1, 5) for buf in self.cache.slot_page_ids(s) for p in buf]
        assert len(owned) == len(set(owned)) == stats.mapped_pages
        assert stats.num_active_slots == len(self.live)
        for slot, (written, _) in self.live.items():
            assert self.cache.capacity_tokens(slot) >= written
            # Each buffer of a slot maps the same number of pages, at the start of the slot's range.
            assert len({len(buf) for buf in self.cache.slot_page_ids(slot)}) == 1

    @invariant()
    def tensors_read_back_what_was_written(self):
        for slot, (written, signature) in self.live.items():
            rows = torch.arange(written, dtype=torch.float32, device=self.cache.k[0].device).view(-1, 1, 1)
            for layer in range(2):
                assert torch.equal(self.cache.k[layer][slot, :written], (signature + rows).expand(-1, 2, 16))
                assert torch.equal(self.cache.v[layer][slot, :written], (signature - rows).expand(-1, 2, 16))


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
