"""Ray Serve request router that places each request on the replica with the most free KV pages.

In vAttention the physical page pool is the capacity that matters: a replica with free batch slots
but few free pages will admit the request late (or preempt others to fit it). Each engine replica
reports its pages through ``record_routing_stats()`` (see ``EngineDeployment``); those reports reach
the router about one ``request_routing_stats_period_s`` late, so the router also subtracts the pages
of every request it has routed to a replica since that replica's last report. Without that local
accounting a burst arriving between two reports would all go to the same "emptiest" replica.

Ranking (one replica per rank, so free pages are the primary key: for each rank Serve only picks the
shortest queue among that rank's replicas):
  1. replicas where the request fits (predicted free pages after it >= 0), most predicted free first;
  2. replicas without fresh stats (e.g. just started);
  3. replicas where it does not fit, least short first.
Ties are broken by queue length. Without a ``RoutingHint`` or without any stats the router falls back
to power-of-two choices.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from deployments.routing_hint import RoutingHint, pages_for_tokens

logger = logging.getLogger("ray.serve")

# Keys of the dict returned by EngineDeployment.record_routing_stats() that the router reads.
REQUIRED_STATS_KEYS = (
    "num_free_pages",
    "num_total_pages",
    "tokens_per_page",
    "pages_per_token_block",
    "num_reserved_pages",
    "num_running",
    "num_waiting",
    "timestamp_s",
)


# A request ranked but not yet routed counts against its first-ranked replica for at most this long.
TENTATIVE_TTL_S = 10.0


@dataclass
class _RoutedRequest:
    routed_at_s: float
    num_pages: int


@dataclass(frozen=True)
class ReplicaScore:
    """Why a replica got its rank (exposed for logging and tests)."""

    replica_id: ReplicaID
    has_stats: bool
    fits: bool
    predicted_free_pages: float
    queue_len: int

    def sort_key(self) -> tuple:
        # 0: fits, 1: unknown, 2: does not fit; then most predicted free pages; then shortest queue.
        group = 1 if not self.has_stats else (0 if self.fits else 2)
        return (group, -self.predicted_free_pages, self.queue_len)


def find_routing_hint(pending_request: PendingRequest | None) -> RoutingHint | None:
    """The request's ``RoutingHint`` (first positional argument or ``routing_hint=`` kwarg), if any."""
    if pending_request is None:
        return None
    if pending_request.args and isinstance(pending_request.args[0], RoutingHint):
        return pending_request.args[0]
    hint = pending_request.kwargs.get("routing_hint") if pending_request.kwargs else None
    return hint if isinstance(hint, RoutingHint) else None


class PageAwareRequestRouter(FIFOMixin, RequestRouter):
    """Ranks replicas by predicted free physical KV pages after the pending request.

    ``request_router_kwargs``:
        stats_max_age_s: reports older than this are ignored (the replica is treated as unknown).
    """

    def initialize_state(self, stats_max_age_s: float = 30.0, **kwargs: Any) -> None:
        if stats_max_age_s <= 0:
            raise ValueError(f"stats_max_age_s must be > 0, got {stats_max_age_s}")
        if kwargs:
            raise ValueError(f"unknown request_router_kwargs for PageAwareRequestRouter: {sorted(kwargs)}")
        self._stats_max_age_s = float(stats_max_age_s)
        # replica -> internal_request_id -> what this router sent there and has not seen complete.
        self._routed: dict[ReplicaID, dict[str, _RoutedRequest]] = {}
        # internal_request_id -> (replica ranked first, pages): requests being routed right now. Serve
        # routes concurrent requests concurrently, so a burst is ranked before any of it is routed;
        # counting these keeps the burst from piling onto one replica.
        self._tentative: dict[str, tuple[ReplicaID, _RoutedRequest]] = {}

    # ---- scoring ----------------------------------------------------------------------------------

    def _fresh_stats(self, replica: RunningReplica, now_s: float) -> dict[str, Any] | None:
        stats = replica.routing_stats
        if not stats or any(key not in stats for key in REQUIRED_STATS_KEYS):
            return None
        if now_s - float(stats["timestamp_s"]) > self._stats_max_age_s:
            return None
        return stats

    def score_replica(self, replica: RunningReplica, hint: RoutingHint, now_s: float) -> ReplicaScore:
        """Predicted free pages on ``replica`` if ``hint``'s request were sent there now."""
        routed = dict(self._routed.get(replica.replica_id, {}))
        for request_id, (replica_id, tentative) in self._tentative.items():
            if replica_id == replica.replica_id and now_s - tentative.routed_at_s < TENTATIVE_TTL_S:
                routed[request_id] = tentative
        stats = self._fresh_stats(replica, now_s)
        cached_queue_len = self._replica_queue_len_cache.get(replica.replica_id)
        if stats is None:
            queue_len = cached_queue_len if cached_queue_len is not None else len(routed)
            return ReplicaScore(replica.replica_id, False, False, -math.inf, queue_len)
        report_time_s = float(stats["timestamp_s"])
        # Requests routed after the report are invisible in it: subtract their pages here.
        unseen = [r for r in routed.values() if r.routed_at_s >= report_time_s]
        unseen_pages = sum(r.num_pages for r in unseen)
        need_pages = pages_for_tokens(hint.num_tokens, float(stats["tokens_per_page"]), int(stats["pages_per_token_block"]))
        predicted = (
            int(stats["num_free_pages"]) - int(stats["num_reserved_pages"]) - unseen_pages - need_pages
        )
        if cached_queue_len is not None:
            queue_len = cached_queue_len
        else:
            queue_len = int(stats["num_running"]) + int(stats["num_waiting"]) + len(unseen)
        return ReplicaScore(replica.replica_id, True, predicted >= 0, float(predicted), queue_len)

    def rank_replicas(
        self, candidate_replicas: list[RunningReplica], hint: RoutingHint
    ) -> tuple[list[RunningReplica], list[ReplicaScore]]:
        """Candidates best first, with the score of each (same order)."""
        now_s = time.time()
        scored = [(self.score_replica(r, hint, now_s), r) for r in candidate_replicas]
        # Shuffle before the stable sort so equal scores do not always favour the same replica.
        random.shuffle(scored)
        scored.sort(key=lambda pair: pair[0].sort_key())
        return [r for _, r in scored], [s for s, _ in scored]

    # ---- RequestRouter interface ------------------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # All ranks full (every replica at max_ongoing_requests): back off instead of spinning.
            pending_request.routing_context.should_backoff = True
        hint = find_routing_hint(pending_request)
        now_s = time.time()
        if hint is None or all(self._fresh_stats(r, now_s) is None for r in candidate_replicas):
            return [self._power_of_two(candidate_replicas)]
        ranked, scores = self.rank_replicas(candidate_replicas, hint)
        if pending_request is not None:
            request_id = pending_request.metadata.internal_request_id
            self._tentative.pop(request_id, None)
            stats = ranked[0].routing_stats if scores[0].has_stats else None
            pages = self._pages_of(hint, stats)
            self._prune_tentative(now_s)
            self._tentative[request_id] = (ranked[0].replica_id, _RoutedRequest(now_s, pages))
        return [[r] for r in ranked]

    @staticmethod
    def _pages_of(hint: RoutingHint | None, stats: dict[str, Any] | None) -> int:
        if hint is None or not stats or "tokens_per_page" not in stats or "pages_per_token_block" not in stats:
            return 0
        return pages_for_tokens(hint.num_tokens, float(stats["tokens_per_page"]), int(stats["pages_per_token_block"]))

    def _prune_tentative(self, now_s: float) -> None:
        # Requests cancelled while being routed never reach on_request_routed/completed.
        for request_id in [k for k, (_, t) in self._tentative.items() if now_s - t.routed_at_s >= TENTATIVE_TTL_S]:
            del self._tentative[request_id]

    @staticmethod
    def _power_of_two(candidate_replicas: list[RunningReplica]) -> list[RunningReplica]:
        if len(candidate_replicas) <= 2:
            return list(candidate_replicas)
        return random.sample(candidate_replicas, 2)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request_id = pending_request.metadata.internal_request_id
        self._tentative.pop(request_id, None)
        replica = self._replicas.get(replica_id)
        pages = self._pages_of(find_routing_hint(pending_request), replica.routing_stats if replica else None)
        self._routed.setdefault(replica_id, {})[request_id] = _RoutedRequest(time.time(), pages)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._tentative.pop(internal_request_id, None)
        routed = self._routed.get(replica_id)
        if routed is not None:
            routed.pop(internal_request_id, None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for replica_id in list(self._routed):
            if replica_id not in live:
                del self._routed[replica_id]
