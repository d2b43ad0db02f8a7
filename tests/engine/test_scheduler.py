"""Scheduler policy over a real (host-memory) VirtualKVCache; no model needed."""

import pytest
import torch

import engine.scheduler as scheduler_module
from engine.config import SchedulerConfig
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from kvcache import KVCacheConfig, VirtualKVCache

PAGE_BYTES = 64 << 10
TOKENS_PER_PAGE = 256  # 1 head * 64 dims * 4 bytes = 256 bytes a token
NUM_BUFFERS = 4  # 2 layers, K and V


@pytest.fixture
def make_scheduler():
    caches = []

    def make(page_rows=8, max_batch_size=4, max_num_seqs=None, max_num_batched_tokens=1024, prefix_seed=None):
        cache = VirtualKVCache(
            KVCacheConfig(
                num_layers=2,
                num_kv_heads=1,
                head_dim=64,
                max_batch_size=max_batch_size,
                max_seq_len=1024,
                dtype=torch.float32,
                device="cpu",
                kv_cache_memory_bytes=page_rows * NUM_BUFFERS * PAGE_BYTES,
            )
        )
        caches.append(cache)
        return Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens), cache, prefix_seed=prefix_seed)

    yield make
    for cache in caches:
        cache.close()


def make_request(request_id: str, num_prompt_tokens: int) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(num_prompt_tokens)),
        params=SamplingParams(),
        max_tokens=1000,
        eos_token_ids=frozenset(),
        detokenizer=None,  # the scheduler never detokenizes
    )


def run_step(scheduler):
    """What the engine does after the forward: advance, and sample where the prompt is complete."""
    plan = scheduler.schedule()
    for item in plan.scheduled:
        # Every row the forward writes must be mapped.
        assert scheduler.kv_cache.capacity_tokens(item.request.slot) >= item.start_pos + item.num_tokens
        item.request.num_computed_tokens = item.start_pos + item.num_tokens
        if item.completes_prompt:
            item.request.output_token_ids.append(7)
    return plan


def test_long_prompt_is_prefilled_in_chunks_then_decoded(make_scheduler):
    scheduler = make_scheduler(max_num_batched_tokens=100)
    request = make_request("a", 250)
    scheduler.add(request)
    chunks = [
        [(s.start_pos, s.num_tokens, s.completes_prompt) for s in run_step(scheduler).scheduled] for _ in range(5)
    ]
    assert chunks == [[(0, 100, False)], [(100, 100, False)], [(200, 50, True)], [(250, 1, True)], [(251, 1, True)]]
    assert request.num_output_tokens == 3


def test_decodes_go_first_and_share_the_token_budget_with_prefill_chunks(make_scheduler):
    scheduler = make_scheduler(max_num_batched_tokens=64)
    first = make_request("first", 10)
    scheduler.add(first)
    run_step(scheduler)
    second = make_request("second", 200)
    scheduler.add(second)
    plan = run_step(scheduler)
    assert [(s.request.request_id, s.num_tokens) for s in plan.scheduled] == [("first", 1), ("second", 63)]
    assert plan.num_batched_tokens == 64


def test_admission_waits_for_pages_in_fifo_order(make_scheduler):
    scheduler = make_scheduler(page_rows=2)  # two requests of one page row each
    requests = [make_request(str(i), 200) for i in range(3)]
    for request in requests:
        scheduler.add(request)
    run_step(scheduler)
    assert [r.status for r in requests] == [RequestStatus.RUNNING, RequestStatus.RUNNING, RequestStatus.WAITING]
    scheduler.finish(requests[0], RequestStatus.FINISHED_STOPPED)
    assert requests[0].slot is None
    plan = run_step(scheduler)
    assert requests[2].status == RequestStatus.RUNNING
    assert {s.request.request_id for s in plan.scheduled} == {"1", "2"}


def test_max_num_seqs_caps_the_running_set(make_scheduler):
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(4):
        scheduler.add(make_request(str(i), 5))
    run_step(scheduler)
    assert scheduler.num_running == 2 and scheduler.num_waiting == 2


def test_pool_exhaustion_preempts_the_newest_and_it_resumes_by_recompute(make_scheduler):
    scheduler = make_scheduler(page_rows=2)
    old, new = make_request("old", 250), make_request("new", 250)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # both prefilled: one page row each, pool full
    preempted = []
    for _ in range(10):
        preempted += run_step(scheduler).preempted
    # Crossing 256 tokens needs a second page row: the newest request gives its pages up.
    assert preempted == [new]
    assert scheduler.num_preemptions == 1 and new.num_preemptions == 1
    assert new.status == RequestStatus.WAITING and new.slot is None and new.num_computed_tokens == 0
    assert scheduler.waiting[0] is new
    assert old.num_output_tokens == 11  # the oldest kept going
    tokens_before = new.num_tokens
    # Its pages are back in the pool, and reported as what it will take again (the router must not see them free).
    assert scheduler.num_preempted_pages == scheduler.kv_cache.pages_for_tokens(tokens_before) > 0
    scheduler.finish(old, RequestStatus.FINISHED_LENGTH)
    plan = run_step(scheduler)
    assert scheduler.num_preempted_pages == 0
    # Re-admitted: prompt and the output so far are recomputed in one prefill, then it samples.
    assert [(s.request, s.start_pos, s.num_tokens) for s in plan.scheduled] == [(new, 0, tokens_before)]
    assert new.num_tokens == tokens_before + 1


def test_next_step_tokens_for_prepare(make_scheduler):
    scheduler = make_scheduler(max_num_batched_tokens=100)
    a, b = make_request("a", 10), make_request("b", 300)
    scheduler.add(a)
    scheduler.add(b)
    plan = scheduler.schedule()
    need = scheduler.next_step_tokens(plan.scheduled)
    assert need == {a.slot: 11, b.slot: 90 + 100}  # a decodes one more; b at most a full budget more


def test_a_slot_freed_under_a_step_in_flight_goes_to_no_one_until_the_step_is_done(make_scheduler):
    scheduler = make_scheduler(max_batch_size=2)
    a, b, c = make_request("a", 10), make_request("b", 10), make_request("c", 10)
    scheduler.add(a)
    scheduler.add(b)
    launched = scheduler.on_launched(scheduler.schedule(), [], None)  # a and b run on the device
    slot_a = a.slot
    scheduler.finish(a, RequestStatus.FINISHED_STOPPED)
    assert a.slot is None and scheduler.kv_cache.stats().num_free_slots == 1  # given back at once...
    scheduler.add(c)
    assert scheduler.schedule().is_empty  # ...but not to c while the step may write slot_a
    assert c.slot is None and scheduler.num_waiting == 1
    scheduler.update_from_output(launched)  # waits for the step
    plan = scheduler.schedule()
    assert c in [s.request for s in plan.scheduled] and c.slot == slot_a


def test_preemption_under_a_step_in_flight_takes_one_victim(make_scheduler):
    """The victim's slot is still in the step on the device: its pages are reclaimed after waiting for that step,
    so one victim is enough, and the request that grows keeps running."""
    scheduler = make_scheduler(page_rows=4)
    old, mid, new = make_request("old", 250), make_request("mid", 250), make_request("new", 250)
    for r in (old, mid, new):
        scheduler.add(r)
    plan = scheduler.schedule()  # three prefills, one page row each: one row left
    launched = scheduler.on_launched(plan, [s.request for s in plan.scheduled], None)
    for r in (old, mid, new):  # the samples landed (what update_from_output would append)
        r.num_placeholder_tokens -= 1
        r.output_token_ids.append(7)
    for _ in range(6):  # decode to 256 tokens, the page row's end, with each step left in flight
        plan = scheduler.schedule()
        assert not plan.preempted
        launched = scheduler.on_launched(plan, [], None)
        for item in plan.scheduled:
            item.request.output_token_ids.append(7)
    # old and mid cross into a second page row: the free row, then the newest request's row, exactly one victim.
    plan = scheduler.schedule()
    assert plan.preempted == [new] and scheduler.num_preemptions == 1
    assert [s.request for s in plan.scheduled] == [old, mid]
    assert launched.fence.is_complete()  # reclaiming new's pages waited for the step that used them


def test_a_request_whose_last_token_is_in_flight_is_not_scheduled_again(make_scheduler):
    scheduler = make_scheduler()
    request = make_request("r", 10)
    request.max_tokens = 2
    scheduler.add(request)
    plan = scheduler.schedule()
    assert plan.scheduled[0].num_tokens == 10
    request.num_computed_tokens = 10
    request.num_placeholder_tokens = 1  # the first token, sampled on the device
    (decode,) = scheduler.schedule().scheduled
    assert decode.token_ids == [-1] and decode.start_pos == 10 and decode.completes_prompt
    request.num_computed_tokens = 11
    request.output_token_ids.append(5)  # the first landed; the second is in flight: max_tokens reached
    assert scheduler.schedule().is_empty


def test_a_burst_of_prefix_hits_is_admitted_over_steps_by_the_cached_pages_it_maps(make_scheduler, monkeypatch):
    # Blocks of 256 tokens, one page in each of the 4 buffers: the token budget of 256 fills 4 pages, four budgets
    # 16, and a hit on a 2-block prefix maps 8 cached pages. Each hit computes 8 tokens only: the token budget (what
    # the first request's last chunk leaves of it) would admit all four at once.
    monkeypatch.setattr(scheduler_module, "CACHED_PAGES_PER_STEP", 4)
    scheduler = make_scheduler(page_rows=16, max_batch_size=8, max_num_batched_tokens=256, prefix_seed=1)
    block = scheduler.block_tokens
    assert block == 256 and scheduler.kv_cache.pages_for_tokens(256) == 4

    def prompt(request_id: str, tail: int) -> Request:
        request = make_request(request_id, 2 * block + 8)
        request.prompt_token_ids[-8:] = [tail] * 8
        return request

    first, *hits = [prompt(str(i), i) for i in range(5)]
    for request in [first, *hits]:
        scheduler.add(request)
    admitted = []
    for _ in range(6):
        plan = scheduler.schedule()
        admitted.append([s.request for s in plan.scheduled if s.request in hits and s.start_pos == 2 * block])
        scheduler.on_launched(plan, [], None)
        for item in plan.scheduled:
            if item.completes_prompt:
                item.request.output_token_ids.append(7)
        scheduler.kv_cache.wait_idle()
    # The prefix is computed once (in two chunks), then two hits a step: 8 cached pages each, 16 a step.
    assert [a for a in admitted if a] == [hits[:2], hits[2:]]
    assert all(r.num_cached_tokens == 2 * block for r in hits)
    assert scheduler.kv_cache.num_cached_pages_mapped == 4 * 8
