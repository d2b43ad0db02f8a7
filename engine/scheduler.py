"""Continuous-batching scheduler over the vAttention cache's slots and pages."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvcache import NoFreeSlotError, PoolExhaustedError, VirtualKVCache

from engine.config import SchedulerConfig
from engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    """Run ``num_tokens`` tokens of ``request`` starting at ``start_pos`` (tokens already in its slot).

    Attributes:
        token_ids: the chunk to run, ``all_token_ids[start_pos : start_pos + num_tokens]``.
        completes_prompt: the chunk reaches the last known token, so its logits give the next token.
            Both are fixed when scheduled (before the step appends a sampled token).
    """

    request: Request
    num_tokens: int
    start_pos: int
    token_ids: list[int] = field(init=False)
    completes_prompt: bool = field(init=False)

    def __post_init__(self) -> None:
        end = self.start_pos + self.num_tokens
        self.token_ids = self.request.token_slice(self.start_pos, end)
        self.completes_prompt = end == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """One iteration's plan: the requests to run (decodes first) and those preempted to make room."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides each iteration which requests run and how many tokens each.

    Policy:
      * running requests first, decodes before prefill chunks (inter-token latency of running
        requests over time-to-first-token of new ones), all under ``max_num_batched_tokens``;
        long prompts are prefilled in chunks;
      * each running request's slot is grown to the rows this step writes; if the pool is exhausted,
        the most recently admitted request is preempted (slot freed, KV recomputed later) until the
        grow succeeds, so the oldest requests always progress;
      * then waiting requests in FIFO order (no overtaking: the head waits until it fits), admitted only
        when a slot is free and the cache can hold their whole prompt plus one decode token, so that
        admitting one does not immediately preempt another. A preempted request rejoins at the head.

    The scheduler only grows and frees slots; it never maps ahead (that is ``kv_cache.prepare``).

    Slots of launched steps still running on the device (``slots_in_flight``, kept by the engine) are not
    given back when their request finishes or is preempted: a freed slot's pages may be unmapped and handed
    to another request, under a kernel still writing them. They are freed by ``release_slots`` once the
    step is done.
    """

    def __init__(self, config: SchedulerConfig, kv_cache: VirtualKVCache) -> None:
        self.config = config
        self.kv_cache = kv_cache
        num_slots = kv_cache.config.max_batch_size
        self.max_num_seqs = min(config.max_num_seqs or num_slots, num_slots)
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_seq_len = kv_cache.config.max_seq_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0
        self.slots_in_flight: frozenset[int] = frozenset()
        self._slots_to_release: list[int] = []

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

    def release_slots(self) -> None:
        """Free the slots held back for a step in flight that are no longer in ``slots_in_flight``."""
        held = []
        for slot in self._slots_to_release:
            if slot in self.slots_in_flight:
                held.append(slot)
            else:
                self.kv_cache.free(slot)
        self._slots_to_release = held

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the plan ---------------------------------------------------------------------------------------------

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
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if not self.kv_cache.can_allocate(min(request.num_tokens + 1, self.max_seq_len)):
                break
            num_tokens = min(request.num_uncomputed_tokens, budget)
            try:
                request.slot = self.kv_cache.allocate(num_tokens)
            except (NoFreeSlotError, PoolExhaustedError):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = 0
            self.running.append(request)
            planned[id(request)] = ScheduledRequest(request, num_tokens, 0)
            budget -= num_tokens

        # Keep the batch in a stable order: decodes, then prefill chunks, then newly admitted.
        out.scheduled = list(planned.values())
        return out

    def next_step_tokens(self, scheduled: list[ScheduledRequest]) -> dict[int, int]:
        """``{slot: rows the next iteration will need}`` for ``kv_cache.prepare``, assuming each request
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

    # ---- internals --------------------------------------------------------------------------------------------

    def _preempt(self, request: Request) -> None:
        """Recompute-style preemption: drop the request's KV and put it first in line."""
        self.running.remove(request)
        self._release_slot(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release_slot(self, request: Request) -> None:
        if request.slot is not None:
            if request.slot in self.slots_in_flight:
                self._slots_to_release.append(request.slot)
            else:
                self.kv_cache.free(request.slot)
            request.slot = None
