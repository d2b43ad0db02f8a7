"""The GPU's ordering rule, checked on the CPU through ``LLMEngine``: no cache row is unmapped, and no slot handed to
another request, while a launched step that touched it may still run.

``HazardMemory`` is a test-only physical-memory backend over real host memory: it learns, per launched step, which rows
the step's forward touches (every row of each sequence up to its length), ties them to the step's fence, and records
a hazard whenever an unmap covers such rows, or a slot is allocated, before that fence is complete. A step counts as
complete only once the host waited on its fence or a later one, as on a GPU (``kvcache.fence.HostFence``). Random
request sequences drive the engine with asynchronous and synchronous scheduling, stop tokens, aborts (also of
requests in the step in flight), preemption from a tight pool, and prefetch.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kvcache import VirtualKVCache
from kvcache.host_memory import HostMemory


class HazardMemory(HostMemory):
    """Host memory that checks every unmap and allocation against the rows of unfinished steps."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: VirtualKVCache | None = None
        self.launched_rows: list[tuple[int, int]] = []  # (slot, rows touched) of the step being launched
        self.steps: list[tuple] = []  # (fence, [(start address, end address)]) of steps not known complete
        self.hazards: list[str] = []
        self.num_checked_unmaps = 0

    def record_fence(self):
        fence = super().record_fence()
        cache = self.cache
        ranges = []
        for slot, rows in self.launched_rows:
            for buffer in range(cache.num_buffers):
                start = cache._address(buffer, slot, 0)
                ranges.append((start, start + rows * cache.token_bytes))
        self.launched_rows = []
        self.steps.append((fence, ranges))
        return fence

    def _unfinished(self):
        self.steps = [(f, r) for f, r in self.steps if not f.is_complete()]
        return self.steps

    def unmap(self, address: int, num_pages: int) -> None:
        end = address + num_pages * self._page_size
        self.num_checked_unmaps += 1
        for _, ranges in self._unfinished():
            if any(start < end and address < stop for start, stop in ranges):
                self.hazards.append(f"unmap of [{address:#x}, {end:#x}) under an unfinished step")
        super().unmap(address, num_pages)

    def check_allocation(self, slot: int) -> None:
        cache = self.cache
        lo = cache._address(0, slot, 0)
        hi = lo + cache.slot_stride_tokens * cache.token_bytes
        for _, ranges in self._unfinished():
            if any(start < hi and lo < stop for start, stop in ranges):
                self.hazards.append(f"slot {slot} handed out under an unfinished step")


def build_engine(async_scheduling: bool, layout: str) -> tuple[LLMEngine, HazardMemory]:
    memory = HazardMemory()

    def make_cache(config):
        cache = VirtualKVCache(config, memory)
        memory.cache = cache
        allocate = cache.allocate

        def checked_allocate(*args, **kwargs):
            slot = allocate(*args, **kwargs)
            memory.check_allocation(slot)
            return slot

        cache.allocate = checked_allocate
        return cache

    from engine.executor import LocalExecutor

    class WatchedExecutor(LocalExecutor):
        def __init__(self, config):
            super().__init__(config, kv_cache_factory=make_cache)

        def run(self, seqs, prev_token_ids=None, prev_rows=None):
            memory.launched_rows = [(slot, start + len(tokens)) for slot, tokens, start in seqs]
            return super().run(seqs, prev_token_ids, prev_rows)

    config = EngineConfig.from_dict(
        {
            "model": "dummy:tiny-llama",
            "max_batch_size": 6,
            "max_seq_len": 2048,
            "max_num_batched_tokens": 128,
            "kv_cache_layout": layout,
            "async_scheduling": async_scheduling,
            "prefetch_tokens": 32,
            # 20 pages of 64 KiB: 2,560 tokens for 6 slots (512 tokens a page in each of the layer-major layout's 4
            # buffers, 128 tokens of all layers a page token-major): long requests must preempt each other.
            "kv_cache_memory_bytes": 20 * (64 << 10),
            "sampler_seed": 0,
        }
    )
    return LLMEngine(config, executor_factory=WatchedExecutor), memory


_ENGINES: dict = {}


def engine_for(async_scheduling: bool, layout: str):
    key = (async_scheduling, layout)
    if key not in _ENGINES:
        _ENGINES[key] = build_engine(async_scheduling, layout)
    return _ENGINES[key]


@pytest.fixture(scope="module", autouse=True)
def _shutdown_engines():
    yield
    for engine, _ in _ENGINES.values():
        engine.shutdown()


request_st = st.tuples(st.integers(1, 1200), st.integers(1, 80), st.booleans(), st.integers(0, 3))
action_st = st.one_of(
    st.tuples(st.just("add"), request_st),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 100)),
)


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("layout", ["layer_major", "token_major"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(actions=st.lists(action_st, min_size=4, max_size=30), seed=st.integers(0, 1000))
def test_no_row_is_unmapped_or_handed_out_under_an_unfinished_step(async_scheduling, layout, actions, seed):
    engine, memory = engine_for(async_scheduling, layout)
    live: list[str] = []
    counter = len(engine.requests) + engine.num_steps * 1000 + seed * 10**6

    def step():
        for out in engine.step():
            if out.finished and out.request_id in live:
                live.remove(out.request_id)

    for kind, arg in actions:
        if kind == "add":
            prompt_len, max_tokens, with_stop, offset = arg
            counter += 1
            request_id = f"r{counter}"
            prompt = [(seed * 7 + i * 13 + offset) % 49152 for i in range(prompt_len)]
            # Random weights: a common token id stops some requests mid-stream.
            params = SamplingParams(
                temperature=0.0 if offset % 2 else 1.0,
                seed=seed,
                max_tokens=max_tokens,
                ignore_eos=True,
                stop_token_ids=list(range(0, 49152, 7)) if with_stop else None,
            )
            engine.add_request(request_id, prompt, params)
            live.append(request_id)
        elif kind == "step":
            for _ in range(arg):
                step()
        elif live:  # abort a live request, often one in the step in flight
            engine.abort(live[arg % len(live)])
    while engine.has_unfinished():
        step()
    assert memory.hazards == []
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_pages + stats.num_reclaimable_pages == stats.num_total_pages  # the pool balances


def test_the_detector_sees_an_unmap_under_a_running_step():
    """The detector itself: a slot freed while its step runs, unmapped without waiting, is reported."""
    engine, memory = build_engine(True, "layer_major")
    try:
        engine.add_request("a", list(range(100)), SamplingParams(max_tokens=4, ignore_eos=True))
        engine.step()  # the prefill is launched and in flight
        (slot,) = [s for s in range(1, 7) if engine.kv_cache.is_active(s)]
        engine.abort("a")
        cache = engine.kv_cache
        cache._fence[slot] = None  # what a cache that ignored the step's fence would believe
        cache.reclaim()
        assert memory.hazards and "unfinished step" in memory.hazards[0]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("layout", ["layer_major", "token_major"])
def test_async_preemption_takes_no_more_victims_than_sync(layout):
    """A tight pool: asynchronous scheduling preempts no more requests than synchronous steps do."""
    prompts = [[(i * 31 + j) % 49152 for j in range(300 + 50 * i)] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    counts = {}
    for async_scheduling in (False, True):
        engine, memory = build_engine(async_scheduling, layout)
        try:
            outputs = engine.generate(prompts, params)
            counts[async_scheduling] = engine.stats().num_preemptions
            assert memory.hazards == []
            assert all(len(o.token_ids) == 120 for o in outputs)
        finally:
            engine.shutdown()
    assert counts[False] > 0  # the pool is tight enough to preempt at all
    assert counts[True] <= counts[False], counts
