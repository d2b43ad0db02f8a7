"""Continuous-batching scheduler over the vAttention cache's slots and pages; the owner of every request's lifecycle.

A step goes through three calls, as in vLLM v1:

* ``schedule() -> SchedulerOutput``: which requests run and how many tokens each; grows their slots, preempts;
* ``on_launched(plan, sampled_requests, sampled) -> LaunchedStep``: the step's forward and sampling are on the
  device: record its fence, count its tokens as computed, add the in-flight samples as placeholders, and map the
  next step's pages while the device works;
* ``update_from_output(launched) -> requests that got a token``: wait for the step, append its tokens, check stops,
  finish requests (their slots go back to the cache, which keeps them out of reach until the step's fence is done).

Requests change state here and nowhere else (``add``, ``finish``, the three calls above).

Prefix caching: a request is admitted with the longest run of its full blocks that the cache has registered
mapped at the start of its slot, and its computation starts after them; once launched steps have computed more of
its full blocks, they are registered for later requests (see ``kvcache.cache``).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.block_hashes import extend_block_hashes
from engine.config import SchedulerConfig
from engine.request import Request, RequestStatus
from engine.sampler import SampledTokens, SamplerOutput
from kvcache import Fence, KVCache, NoFreeSlotError, PoolExhaustedError

logger = logging.getLogger(__name__)

# Cached pages a step's admissions may map, in token budgets' worth of pages (see ``Scheduler.schedule``). Mapping
# them costs the host ~40 us a page on the H100; a step that admits prefix hits runs eagerly (its prefill rows are no
# graph), ~40 ms of launches. A burst of 196 hits on a 2K-token prompt with one budget (512 pages) took 49 such steps:
# TTFT p50 1.4-2.0 s; unbounded, every hit waited for all the mapping: 1.3 s
# (benchmarks/results/prefix_admission_h100_a7d4526.log; with four, prefix_h200.json).
CACHED_PAGES_PER_STEP = 4


class SequenceChunk(NamedTuple):
    """What the executor runs for one sequence: ``token_ids`` at positions ``start_pos ..`` of cache slot ``slot``
    (``start_pos`` tokens of the sequence are in the slot already)."""

    slot: int
    token_ids: list[int]
    start_pos: int


@dataclass
class ScheduledRequest:
    """Run ``num_tokens`` tokens of ``request`` starting at ``start_pos`` (tokens already in its slot).

    Attributes:
        slot: the request's cache slot when scheduled.
        token_ids: the chunk to run, ``all_token_ids[start_pos : start_pos + num_tokens]``.
        completes_prompt: the chunk reaches the last known token, so its logits give the next token.
            All are fixed when scheduled (before the step appends a sampled token or the request finishes).
    """

    request: Request
    num_tokens: int
    start_pos: int
    slot: int = field(init=False)
    token_ids: list[int] = field(init=False)
    completes_prompt: bool = field(init=False)

    def __post_init__(self) -> None:
        self.slot = self.request.slot
        end = self.start_pos + self.num_tokens
        self.token_ids = self.request.token_slice(self.start_pos, end)
        self.completes_prompt = end == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """One iteration's plan: the requests to run (decodes first) and those preempted to make room."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def chunks(self) -> list[SequenceChunk]:
        """The executor's input, one chunk per scheduled request, in order."""
        return [SequenceChunk(s.slot, s.token_ids, s.start_pos) for s in self.scheduled]

    @property
    def sampling_rows(self) -> list[int]:
        """Rows of the plan whose logits give a next token (their chunk completes the known tokens)."""
        return [i for i, s in enumerate(self.scheduled) if s.completes_prompt]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class LaunchedStep:
    """A step on the device whose tokens have not been processed yet.

    Attributes:
        plan: what ran.
        fence: complete once the step's kernels (forward and sampling) have finished.
        requests: the requests that sample in this step, in the order of ``sampled``'s rows.
        sampled: their tokens (on the device until read), None when no request samples.
        rows: ``request -> row`` of ``sampled.token_ids``, where the next step finds a placeholder's token.
    """

    plan: SchedulerOutput
    fence: Fence
    requests: list[Request]
    sampled: SampledTokens | None
    rows: dict[Request, int] = field(init=False)

    def __post_init__(self) -> None:
        self.rows = {request: i for i, request in enumerate(self.requests)}

    def placeholder_rows(self, plan: SchedulerOutput) -> list[int] | None:
        """For each request of ``plan``, the row of its last input token in this step's samples (-1: on the host);
        None when no input of ``plan`` is a placeholder."""
        if self.sampled is None or not any(s.request.num_placeholder_tokens for s in plan.scheduled):
            return None
        return [self.rows.get(s.request, -1) for s in plan.scheduled]


class Scheduler:
    """Decides each iteration which requests run and how many tokens each, and moves requests through their states.

    Policy:
      * running requests first, decodes before prefill chunks (inter-token latency of running
        requests over time-to-first-token of new ones), all under ``max_num_batched_tokens``;
        long prompts are prefilled in chunks;
      * each running request's slot is grown to the rows this step writes; if the pool is exhausted,
        the most recently admitted request is preempted (slot freed, KV recomputed later) until the
        grow succeeds, so the oldest requests always progress. A victim's pages are usable at once: the cache
        waits for the step in flight that still touches them, so no more requests are preempted than pages require;
      * then waiting requests in FIFO order (no overtaking: the head waits until it fits), admitted only
        when a slot is free and the cache can hold their whole prompt plus one decode token, so that
        admitting one does not immediately preempt another. A preempted request rejoins at the head.
      * with prefix caching, a waiting request whose next uncached block a running prefill is computing waits for
        it (the head of the queue, so those behind it too): a burst of prompts sharing a prefix computes it once;
      * a step admits no more once its admissions have mapped ``CACHED_PAGES_PER_STEP`` token budgets' worth of
        cached pages (the admission that crosses the bound still goes ahead): a burst of prefix hits is spread over
        a few steps rather than mapped before one launch. (Unmapping a reused slot's old pages is not counted.)

    Slots go back to the cache as soon as their request finishes or is preempted; the cache itself keeps a slot's
    rows mapped, and the slot from other requests, until the fence of the last step that touched it completes.
    """

    def __init__(self, config: SchedulerConfig, kv_cache: KVCache, prefix_seed: int | None = None) -> None:
        """``prefix_seed``: the key block 0 chains from (``engine.block_hashes.prefix_seed``); None turns prefix
        caching off."""
        self.config = config
        self.kv_cache = kv_cache
        self.prefix_seed = prefix_seed
        self.block_tokens = kv_cache.block_tokens
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache at admission
        self.prefix_hits = 0  # of which found cached
        num_slots = kv_cache.config.max_batch_size
        self.max_num_seqs = min(config.max_num_seqs or num_slots, num_slots)
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_seq_len = kv_cache.config.max_seq_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0

    # ---- queue management --------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Mark ``request`` finished with ``status`` and give its slot back (pages stay mapped)."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        self._release_slot(request)
        request.status = status

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_preempted_pages(self) -> int:
        """Pages the requests preempted after their first token held and will take again when re-admitted (their
        prompt and output so far): back in the pool now, but not free for anyone else for long. (One preempted
        before its first token is, to its caller, a request not started: its whole footprint is still to come.)"""
        return sum(
            self.kv_cache.pages_for_tokens(r.num_tokens)
            for r in self.waiting
            if r.num_preemptions and r.output_token_ids
        )

    # ---- the step ---------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan one iteration; grows the slots of everything scheduled so the forward may write its rows."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        planned: dict[int, ScheduledRequest] = {}  # id(request) -> plan, to undo when a victim was planned

        # A request whose last token is still in flight has nothing left to run: it finishes when it lands.
        decodes = [r for r in self.running if r.num_uncomputed_tokens == 1 and not r.has_all_output_tokens]
        prefills = [r for r in self.running if r.num_uncomputed_tokens > 1]
        for request in decodes + prefills:
            if budget <= 0:
                break
            if request.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_tokens = min(request.num_uncomputed_tokens, budget)
            target = request.num_computed_tokens + num_tokens
            while True:
                try:
                    self.kv_cache.grow(request.slot, target)
                    break
                except PoolExhaustedError:
                    victim = self.running[-1]
                    self._preempt(victim)
                    out.preempted.append(victim)
                    undone = planned.pop(id(victim), None)
                    if undone is not None:
                        budget += undone.num_tokens
                    if victim is request:
                        break
            if request.status != RequestStatus.RUNNING:
                continue
            planned[id(request)] = ScheduledRequest(request, num_tokens, request.num_computed_tokens)
            budget -= num_tokens

        # Admitting while preempting would thrash: the pages just freed belong to the preempted.
        # Mapping is host work the step waits for (tens of microseconds a page on a GPU), and a prefix hit maps its
        # cached pages without spending the token budget: admissions stop once they have mapped CACHED_PAGES_PER_STEP
        # token budgets' worth of cached pages, so a burst of hits is admitted over a few steps, each launching after
        # its share rather than all after the whole burst's.
        in_progress = self._blocks_in_progress()
        cached_pages_budget = self.kv_cache.num_cached_pages_mapped + CACHED_PAGES_PER_STEP * (
            self.kv_cache.pages_for_tokens(self.max_num_batched_tokens)
        )
        while (
            not out.preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
            and self.kv_cache.num_cached_pages_mapped < cached_pages_budget
        ):
            request = self.waiting[0]
            final_tokens = min(request.num_tokens + 1, self.max_seq_len)
            prefix = self._cached_prefix(request)
            if self._next_block_in_progress(request, len(prefix), in_progress):
                break  # a running prefill is computing it: wait a step or two and reuse it
            if not self.kv_cache.can_allocate(final_tokens, prefix):
                break
            cached = len(prefix) * self.block_tokens
            num_tokens = min(request.num_tokens - cached, budget)
            try:
                request.slot = self.kv_cache.allocate(cached + num_tokens, final_tokens=final_tokens, prefix=prefix)
            except (NoFreeSlotError, PoolExhaustedError):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = cached
            if request.num_cached_tokens is None:
                request.num_cached_tokens = cached
            if self.prefix_seed is not None:
                self.prefix_queries += request.num_tokens
                self.prefix_hits += cached
            self.running.append(request)
            planned[id(request)] = ScheduledRequest(request, num_tokens, cached)
            budget -= num_tokens
            in_progress.update(request.block_hashes[len(prefix) :])

        # Keep the batch in a stable order: decodes, then prefill chunks, then newly admitted.
        out.scheduled = list(planned.values())
        return out

    def on_launched(
        self, plan: SchedulerOutput, sampled_requests: list[Request], sampled: SampledTokens | None
    ) -> LaunchedStep:
        """``plan``'s forward and the sampling of ``sampled_requests`` are launched: record the step's fence over
        its slots, count its tokens as computed and its samples as placeholders, then map the next step's pages
        (the driver calls overlap the device work just launched)."""
        fence = self.kv_cache.record_use(s.slot for s in plan.scheduled)
        for item in plan.scheduled:
            assert item.start_pos >= self.kv_cache.head_tokens(item.slot), "a step wrote a shared block"
            item.request.num_computed_tokens = item.start_pos + item.num_tokens
            # A request finished while its step launched (its sampling failed) has no slot left to register from.
            if self.prefix_seed is not None and item.request.slot is not None:
                self._register_blocks(item.request)
        for request in sampled_requests:
            request.num_placeholder_tokens += 1
        self.kv_cache.map_ahead(self.next_step_tokens(plan.scheduled))
        return LaunchedStep(plan, fence, sampled_requests, sampled)

    def update_from_output(self, launched: LaunchedStep) -> list[Request]:
        """Wait for ``launched`` and hand its tokens to their requests: append, check stops, finish. Returns the
        requests that got a token (finished ones included), in sampling order; a request whose token cannot be
        processed (e.g. its detokenization fails) is finished as aborted with ``request.error`` set."""
        launched.fence.wait()
        if launched.sampled is None:
            return []
        result: SamplerOutput = launched.sampled.result()
        progressed = []
        for request, token_id, logprob in zip(launched.requests, result.token_ids, result.logprobs):
            request.num_placeholder_tokens -= 1
            if request.is_finished:  # aborted, or stopped by the token before (a row run for nothing)
                continue
            try:
                status = request.append_output_token(token_id, logprob)
            except Exception as exc:  # one request's failure must not take the others down
                logger.exception("request %s failed while processing its token", request.request_id)
                request.error = exc
                status = RequestStatus.FINISHED_ABORTED
            if status is not None:
                self.finish(request, status)
            progressed.append(request)
        return progressed

    def next_step_tokens(self, scheduled: list[ScheduledRequest]) -> dict[int, int]:
        """``{slot: rows the next iteration will need}`` for ``kv_cache.map_ahead``, assuming each request
        keeps running: one more token after a completed prompt, else the next prefill chunk."""
        need = {}
        for item in scheduled:
            request = item.request
            if request.slot is None:
                continue
            computed = item.start_pos + item.num_tokens
            if item.completes_prompt:
                next_rows = computed + 1
            else:
                next_rows = computed + min(request.num_tokens - computed, self.max_num_batched_tokens)
            need[request.slot] = min(next_rows, self.max_seq_len)
        return need

    # ---- prefix caching ---------------------------------------------------------------------------------------

    def _update_block_hashes(self, request: Request) -> list[int]:
        """The keys of the request's full blocks of known tokens (computed once, extended as tokens land)."""
        hashes = request.block_hashes
        known = request.num_known_tokens
        if (len(hashes) + 1) * self.block_tokens <= known:
            tokens = request.token_slice(len(hashes) * self.block_tokens, known)
            extend_block_hashes(hashes, tokens, self.block_tokens, self.prefix_seed)
        return hashes

    def _cached_prefix(self, request: Request) -> list[int]:
        """Keys of the request's leading blocks that the cache holds, leaving at least one token to compute
        (its logits give the next token)."""
        if self.prefix_seed is None:
            return []
        usable = (request.num_tokens - 1) // self.block_tokens
        keys = self._update_block_hashes(request)[:usable]
        return keys[: self.kv_cache.match_prefix(keys)]

    def _blocks_in_progress(self) -> set[int]:
        """Keys of the full blocks that running prefills have still to compute (registered once computed); only
        looked at when a request waits."""
        if self.prefix_seed is None or not self.waiting:
            return set()
        return {
            key
            for r in self.running
            if r.num_uncomputed_tokens > 1
            for key in r.block_hashes[r.num_computed_tokens // self.block_tokens :]
        }

    def _next_block_in_progress(self, request: Request, num_cached_blocks: int, in_progress: set[int]) -> bool:
        """Whether the first block the request would compute is being computed by a running prefill: a burst of
        prompts sharing a prefix (or the ``n`` sequences of one request) computes it once, the rest reuse it."""
        if not in_progress:
            return False
        usable = (request.num_tokens - 1) // self.block_tokens
        keys = request.block_hashes
        return num_cached_blocks < min(usable, len(keys)) and keys[num_cached_blocks] in in_progress

    def _register_blocks(self, request: Request) -> None:
        """Registers the request's blocks that launched steps have now computed in full (known tokens only)."""
        full = min(request.num_computed_tokens, request.num_known_tokens) // self.block_tokens
        if full <= request.num_registered_blocks:
            return
        keys = self._update_block_hashes(request)[:full]
        head = self.kv_cache.register(request.slot, keys)
        # A block registered by another slot stops this one's chain for good: it is never tried again.
        request.num_registered_blocks = full if head == full else self.max_seq_len

    # ---- internals --------------------------------------------------------------------------------------------

    def _preempt(self, request: Request) -> None:
        """Recompute-style preemption: drop the request's KV and put it first in line."""
        self.running.remove(request)
        self._release_slot(request)
        request.num_computed_tokens = 0
        request.num_registered_blocks = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release_slot(self, request: Request) -> None:
        if request.slot is not None:
            self.kv_cache.free(request.slot)
            request.slot = None
