"""Ray Serve request router that sends each request where its KV pages fit, on the shortest queue.

In vAttention the physical page pool is the capacity that matters: a replica with free batch slots
but few free pages will admit the request late (or preempt others to fit it). Each engine replica
reports its pages through ``record_routing_stats()`` (see ``EngineDeployment``).

Prediction: a replica's free pages after the request are its reported free pages, minus what its
accepted requests will still claim (``num_reserved_pages``), minus the pages of requests this router
sent there that the report does not list among the replica's accepted requests (routed after the
report was taken, or not yet started there), minus the pages of requests being routed right now (a
burst is ranked before any of it is routed), minus the request's own pages. With prefix affinity, a request counts
only the pages that the prompts of requests this router sent to the replica before it, and has not seen finish, do
not already cover (its prefix's pages are mapped from theirs, not taken from the pool; a burst on one system prompt
counts it once). A prefix the replica's report lists earns no such credit: its pages may sit among the reclaimable
pages the report counts as free, and mapping them takes them from there. A request routed again
(Serve retries while every rank is full; the ingress retries after a dead replica) is first taken out
of that accounting, so it never counts against itself. A report is fresh for ``stats_max_age_s`` after
the router saw its ``report_seq`` change, by the router's own clock: the replica's clock is never
compared with the router's.

Ranking: Serve tries the returned ranks in order and, within a rank, takes the replica with the
shortest queue. Pages should decide only where they are scarce (ranking one replica per rank by pages,
whatever the queues, gave 2-3x the median TTFT of power-of-two choices at saturation), so:
  1. roomy replicas: the request fits and leaves at least ``roomy_free_page_fraction`` of the pool
     free. Queue length decides among them, one per rank, shortest first: Serve's queue length plus
     the requests this router is placing there right now and Serve has not sent yet (Serve's own cache
     does not see a burst that is routed concurrently, which would all go to the same "shortest" queue;
     once Serve hands a request its replica it sends it and its cache counts it, so this router stops
     counting it, and moves its pages to the replica Serve chose if that is not the one ranked first);
  2. tight fits, one per rank, most predicted free pages first;
  3. replicas without fresh stats (e.g. just started), one rank;
  4. replicas where it does not fit now, as one rank: Serve takes the shortest queue, as its default router does.
     It waits for pages wherever it goes; ranked by pages, requests at saturation (every replica short, as the
     reserved growth of its queue exceeds its pool) went to the replica holding the fewest long requests whatever
     its queue: 1.2-1.5x the default's median TTFT and more preemptions on 2 x H200.
Replicas whose engine reports itself unhealthy (dead) are left out while any other replica is there.
Without a ``RoutingHint`` or without any stats the router falls back to power-of-two choices.

Prefix affinity: a replica whose cache holds the start of the prompt computes only the rest, so among roomy
replicas, those whose queue is at most ``prefix_queue_slack`` requests longer than the shortest come first, the one
holding the most prompt tokens first (queue length among equals; a prefix under ``prefix_min_cached_tokens`` does
not count). How much of the prompt a replica holds: the
``RoutingHint`` carries the keys of a few of the prompt's blocks (``prefix_probe``), the replica's report the keys
of its cached blocks at the same chain positions (``prefix_keys``, ``engine.prefix_summary``); a prompt routed there
and not finished yet counts as cached there too (it will be by the time this request runs). A replica short of
pages is never chosen for its prefix: tiers still come first, and tight fits rank by pages (cached tokens only
break ties).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
from ray.util.metrics import Counter

from deployments.routing_hint import RoutingHint
from deployments.routing_report import RoutingReport

logger = logging.getLogger("ray.serve")

# A request ranked but not yet routed counts against its first-ranked replica for at most this long.
TENTATIVE_TTL_S = 10.0
# How long a completion that came before its routing was recorded waits for that record (Serve runs the routing
# callback moments later, on the same event loop).
COMPLETED_UNROUTED_TTL_S = 60.0


@dataclass
class _RoutedRequest:
    routed_at_s: float
    num_pages: int  # what it takes from the pool where it was sent: less the prefix of requests sent there before it
    prefix_keys: frozenset[int] = frozenset()  # its prompt's probe keys: cached where it runs, once it has run
    # Its whole footprint (prompt and output): what a report counts for it before its first token. Kept for requests
    # routed (what a finished one gives back), not for those being routed.
    full_pages: int = 0


@dataclass
class _Placing:
    """A request this router ranked and Serve has not reported routed yet."""

    replica_id: ReplicaID  # ranked first; once Serve chose, the one it chose
    request: _RoutedRequest
    sent: bool = False  # Serve chose its replica (and sends it at once): Serve's queue-length cache counts it


@dataclass
class _ReportSeen:
    report: RoutingReport
    received_at_s: float  # router's clock
    prefix_keys: frozenset[int] | None = None  # the report's prefix summary as a set, made when first needed


class Tier(enum.IntEnum):
    """Where a replica stands for one request, best first (see the module docstring)."""

    ROOMY = 0
    TIGHT = 1
    UNKNOWN = 2
    SHORT = 3
    UNHEALTHY = 4


# Tiers ranked as one group (Serve picks the shortest queue in it); the others one replica per rank.
_GROUPED_TIERS = (Tier.UNKNOWN, Tier.SHORT, Tier.UNHEALTHY)


@dataclass(frozen=True)
class ReplicaScore:
    """Why a replica got its rank (exposed for logging and tests)."""

    replica_id: ReplicaID
    tier: Tier
    predicted_free_pages: float
    queue_len: int
    cached_tokens: int = 0  # prompt tokens the replica holds or will hold (to within the probe's spacing)
    credit_tokens: int = 0  # of those, the ones requests this router sent there will have computed: not new pages


def find_routing_hint(pending_request: PendingRequest | None) -> RoutingHint | None:
    """The request's ``RoutingHint`` (first positional argument or ``routing_hint=`` kwarg), if any."""
    if pending_request is None:
        return None
    if pending_request.args and isinstance(pending_request.args[0], RoutingHint):
        return pending_request.args[0]
    hint = pending_request.kwargs.get("routing_hint") if pending_request.kwargs else None
    return hint if isinstance(hint, RoutingHint) else None


def _probe_keys(hint: RoutingHint | None) -> frozenset[int]:
    return frozenset(key for _, key in hint.prefix_probe) if hint is not None else frozenset()


class PageAwareRequestRouter(RequestRouter):
    """Ranks replicas by predicted free physical KV pages after the pending request, and, among those with room
    to spare, by the prompt tokens they hold cached and by queue length.

    Without Serve's ``FIFOMixin``: a replica chosen for a request goes to that request (Serve's default matching by
    request id), not to the oldest one waiting. Ranked for one prompt's size and prefix and handed to another's, a
    burst's requests landed apart from their prefixes (as Ray Serve LLM's prefix router, which has no FIFO either).

    ``request_router_kwargs``:
        stats_max_age_s: a report not renewed for this long is ignored (the replica is treated as unknown).
        roomy_free_page_fraction: the fraction of a replica's pool that must stay free after the request
            for the replica to be "roomy" (ranked with the others by queue length). 0 ranks every replica
            where the request fits by queue length; 1 ranks all by pages.
        prefix_affinity: rank roomy replicas by the prompt tokens they hold (off: pages and queues only).
        prefix_queue_slack: how many requests longer than the shortest roomy queue a replica's queue may be for
            its cached prefix to count.
        prefix_min_cached_tokens: a cached prefix shorter than this does not count: it saves little prefill, and
            the first tokens of a chat template are cached wherever any chat ran.
    """

    def initialize_state(
        self,
        stats_max_age_s: float = 30.0,
        roomy_free_page_fraction: float = 0.2,
        prefix_affinity: bool = True,
        prefix_queue_slack: int = 4,
        prefix_min_cached_tokens: int = 256,
        **kwargs: Any,
    ) -> None:
        if stats_max_age_s <= 0:
            raise ValueError(f"stats_max_age_s must be > 0, got {stats_max_age_s}")
        if not 0.0 <= roomy_free_page_fraction <= 1.0:
            raise ValueError(f"roomy_free_page_fraction must be in [0, 1], got {roomy_free_page_fraction}")
        if not isinstance(prefix_affinity, bool):
            raise ValueError(f"prefix_affinity must be a bool, got {prefix_affinity!r}")
        if not isinstance(prefix_queue_slack, int) or prefix_queue_slack < 0:
            raise ValueError(f"prefix_queue_slack must be an int >= 0, got {prefix_queue_slack!r}")
        if not isinstance(prefix_min_cached_tokens, int) or prefix_min_cached_tokens < 1:
            raise ValueError(f"prefix_min_cached_tokens must be an int >= 1, got {prefix_min_cached_tokens!r}")
        if kwargs:
            raise ValueError(f"unknown request_router_kwargs for PageAwareRequestRouter: {sorted(kwargs)}")
        self._stats_max_age_s = float(stats_max_age_s)
        self._roomy_free_page_fraction = float(roomy_free_page_fraction)
        self._prefix_affinity = prefix_affinity
        self._prefix_queue_slack = prefix_queue_slack
        self._prefix_min_cached_tokens = prefix_min_cached_tokens
        # replica -> internal_request_id -> what this router sent there and has not seen complete.
        self._routed: dict[ReplicaID, dict[str, _RoutedRequest]] = {}
        # replica -> internal_request_id -> (completed at, router's clock; what it was): a report taken before a
        # request completed still counts its pages as held or reserved.
        self._completed: dict[ReplicaID, dict[str, tuple[float, _RoutedRequest]]] = {}
        # (replica, internal_request_id) -> when it completed, for a completion that came before Serve told this
        # router where the request went (a stream that ends or fails at once): that routing is then not recorded,
        # or its pages would count as on their way to the replica for good.
        self._completed_unrouted: dict[tuple[ReplicaID, str], float] = {}
        # internal_request_id -> (replica ranked first, pages): requests being routed right now. Serve
        # routes concurrent requests concurrently, so a burst is ranked before any of it is routed;
        # counting these keeps the burst from piling onto one replica.
        self._tentative: dict[str, _Placing] = {}
        # replica -> the last report seen and when, by this router's clock.
        self._reports: dict[ReplicaID, _ReportSeen] = {}
        # Exported like the engines' metrics (the ingress's /metrics): which tier decided, e.g. how often no replica
        # had room (short) at saturation. A request ranked again (Serve backs off while every replica is full)
        # counts again.
        self._rankings = Counter(
            "vattn_router_rankings",
            description="Rankings made by the page-aware router, by the tier of the replica ranked first: roomy, "
            "tight, unknown (no fresh report), short (the request fits nowhere now), unhealthy, or no_stats (power "
            "of two choices: no routing hint or no report at all)",
            tag_keys=("tier",),
        )

    # ---- scoring ----------------------------------------------------------------------------------

    def _note_report(self, replica: RunningReplica, now_s: float) -> _ReportSeen | None:
        """The replica's last report and when this router first saw it (now, if it is new); None when it has
        reported nothing the router can read."""
        stats = replica.routing_stats
        seq = stats.get("report_seq") if stats else None
        seen = self._reports.get(replica.replica_id)
        if seen is not None and seen.report.report_seq == seq:
            return seen
        report = RoutingReport.from_dict(stats)
        if report is None:
            return None
        seen = self._reports[replica.replica_id] = _ReportSeen(report, now_s)
        return seen

    def _fresh_report(self, replica: RunningReplica, now_s: float) -> RoutingReport | None:
        seen = self._note_report(replica, now_s)
        if seen is None or now_s - seen.received_at_s > self._stats_max_age_s:
            return None
        return seen.report

    def _last_report(self, replica_id: ReplicaID) -> RoutingReport | None:
        seen = self._reports.get(replica_id)
        return seen.report if seen is not None else None

    def score_replica(self, replica: RunningReplica, hint: RoutingHint, now_s: float) -> ReplicaScore:
        """Predicted free pages on ``replica`` if ``hint``'s request were sent there now, and its tier."""
        routed = dict(self._routed.get(replica.replica_id, {}))
        placing = 0  # requests being placed here that Serve has not sent yet
        for request_id, p in self._tentative.items():
            if p.replica_id == replica.replica_id and now_s - p.request.routed_at_s < TENTATIVE_TTL_S:
                routed[request_id] = p.request
                placing += not p.sent
        report = self._fresh_report(replica, now_s)
        cached_queue_len = self._replica_queue_len_cache.get(replica.replica_id)
        if report is None or not report.healthy:
            queue_len = cached_queue_len if cached_queue_len is not None else len(routed)
            tier = Tier.UNKNOWN if report is None else Tier.UNHEALTHY
            return ReplicaScore(replica.replica_id, tier, -math.inf, queue_len)
        # What this router sent here that the report does not count yet, and what it counts but has completed since.
        accepted = report.accepted
        unseen = [r for request_id, r in routed.items() if request_id not in accepted]
        completed = self._completed.get(replica.replica_id, {})
        gone = [r for request_id, (_, r) in completed.items() if request_id in accepted]
        cached, credit = self._prefix_tokens(replica.replica_id, hint, routed.values())
        # A finished request gives back its whole footprint (its prompt's shared part included: cached blocks no
        # request holds count as free), which is what a report taken before its first token counted for it; one
        # taken later counted a shared prefix once for all its requests, so the sum is capped at the pool before
        # what is still to come is taken off.
        free_now = min(
            report.num_free_pages - report.num_reserved_pages + sum(r.full_pages for r in gone), report.num_total_pages
        )
        predicted = free_now - sum(r.num_pages for r in unseen) - self._pages_of(hint, report, credit)
        if predicted < 0:
            tier = Tier.SHORT
        elif predicted >= self._roomy_free_page_fraction * report.num_total_pages:
            tier = Tier.ROOMY
        else:
            tier = Tier.TIGHT
        if cached_queue_len is not None:
            queue_len = cached_queue_len + placing
        else:
            queue_len = report.num_running + report.num_waiting + len(unseen)
        return ReplicaScore(replica.replica_id, tier, float(predicted), queue_len, cached, credit)

    def _prefix_tokens(
        self, replica_id: ReplicaID, hint: RoutingHint | None, routed: Iterable[_RoutedRequest]
    ) -> tuple[int, int]:
        """``(cached, credit)``: prompt tokens of ``hint``'s request the replica holds (its report) or soon will (the
        prompts of ``routed``: requests sent there and not finished), and of those the ones ``routed`` alone covers,
        which the request will not take new pages for. Each 0 under ``prefix_min_cached_tokens``."""
        if hint is None or not self._prefix_affinity or not hint.prefix_probe:
            return 0, 0
        seen = self._reports.get(replica_id)  # its fresh report, noted by _fresh_report
        reported: frozenset[int] = frozenset()
        if seen is not None:
            if seen.prefix_keys is None:
                seen.prefix_keys = frozenset(seen.report.prefix_keys)
            reported = seen.prefix_keys
        in_flight = frozenset().union(*(r.prefix_keys for r in routed))
        cached = credit = 0
        for num_tokens, key in hint.prefix_probe:
            if key in in_flight:
                credit = max(credit, num_tokens)
            if key in in_flight or key in reported:
                cached = max(cached, num_tokens)
        least = self._prefix_min_cached_tokens
        return (cached if cached >= least else 0), (credit if credit >= least else 0)

    def rank_replicas(
        self, candidate_replicas: list[RunningReplica], hint: RoutingHint, now_s: float
    ) -> list[list[tuple[ReplicaScore, RunningReplica]]]:
        """Ranks of (score, replica), best first; within a rank, the replica Serve would take first."""
        scored = [(self.score_replica(r, hint, now_s), r) for r in candidate_replicas]
        # Shuffle before the stable sorts so equal scores do not always favour the same replica.
        random.shuffle(scored)
        if any(score.tier != Tier.UNHEALTHY for score, _ in scored):
            scored = [pair for pair in scored if pair[0].tier != Tier.UNHEALTHY]
        ranks: list[list[tuple[ReplicaScore, RunningReplica]]] = []
        for tier in Tier:
            members = [pair for pair in scored if pair[0].tier == tier]
            if tier in _GROUPED_TIERS:
                if members:
                    ranks.append(sorted(members, key=lambda pair: pair[0].queue_len))
            elif tier == Tier.ROOMY:
                members.sort(key=lambda pair: (pair[0].queue_len, -pair[0].predicted_free_pages))
                if members:
                    # Within reach of the shortest queue, where the prompt's prefix is cached first.
                    reach = members[0][0].queue_len + self._prefix_queue_slack
                    near = [pair for pair in members if pair[0].queue_len <= reach]
                    near.sort(key=lambda pair: -pair[0].cached_tokens)
                    members = near + members[len(near) :]
                ranks.extend([pair] for pair in members)
            else:
                members.sort(
                    key=lambda pair: (-pair[0].predicted_free_pages, -pair[0].cached_tokens, pair[0].queue_len)
                )
                ranks.extend([pair] for pair in members)
        return ranks

    # ---- RequestRouter interface ------------------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        now_s = self._get_curr_time_s()
        if pending_request is not None:
            # All ranks full (every replica at max_ongoing_requests): back off instead of spinning.
            pending_request.routing_context.should_backoff = True
            # Routed again (a retry): its earlier placement must not count against its new one.
            self._forget_request(pending_request.metadata.internal_request_id)
        hint = find_routing_hint(pending_request)
        if hint is None or all(self._fresh_report(r, now_s) is None for r in candidate_replicas):
            if pending_request is not None:
                self._rankings.inc(tags={"tier": "no_stats"})
            return [self._power_of_two(candidate_replicas)]
        ranks = self.rank_replicas(candidate_replicas, hint, now_s)
        if pending_request is not None:
            score, likely = ranks[0][0]
            self._rankings.inc(tags={"tier": score.tier.name.lower()})
            report = self._last_report(likely.replica_id) if score.tier not in (Tier.UNKNOWN, Tier.UNHEALTHY) else None
            self._prune_tentative(now_s)
            request_id = pending_request.metadata.internal_request_id
            self._tentative[request_id] = _Placing(
                likely.replica_id,
                _RoutedRequest(now_s, self._pages_of(hint, report, score.credit_tokens), _probe_keys(hint)),
            )
            # Serve hands the request its replica through this future and sends it in the same turn of the loop.
            pending_request.future.add_done_callback(functools.partial(self._on_replica_chosen, request_id))
        return [[replica for _, replica in rank] for rank in ranks]

    @staticmethod
    def _pages_of(hint: RoutingHint | None, report: RoutingReport | None, cached_tokens: int = 0) -> int:
        if hint is None or report is None:
            return 0
        return hint.pages(report.tokens_per_page, report.pages_per_token_block, cached_tokens)

    def _forget_request(self, request_id: str) -> None:
        self._tentative.pop(request_id, None)
        for table in (*self._routed.values(), *self._completed.values()):
            table.pop(request_id, None)

    def _on_replica_chosen(self, request_id: str, future: asyncio.Future) -> None:
        placing = self._tentative.get(request_id)
        if placing is None:
            return
        if future.cancelled() or future.exception() is not None:
            del self._tentative[request_id]
            return
        placing.replica_id = future.result().replica_id
        placing.sent = True

    def _prune_tentative(self, now_s: float) -> None:
        # Requests cancelled while being routed, or after they were sent, never reach on_request_routed/completed.
        for request_id in [k for k, p in self._tentative.items() if now_s - p.request.routed_at_s >= TENTATIVE_TTL_S]:
            del self._tentative[request_id]

    @staticmethod
    def _power_of_two(candidate_replicas: list[RunningReplica]) -> list[RunningReplica]:
        # In random order even when there are only two: Serve takes the first of a rank's shortest queues, so a fixed
        # order sends every tie to the same replica.
        return random.sample(candidate_replicas, min(2, len(candidate_replicas)))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request_id = pending_request.metadata.internal_request_id
        self._tentative.pop(request_id, None)
        if self._completed_unrouted.pop((replica_id, request_id), None) is not None:
            return  # it completed already
        replica = self._replicas.get(replica_id)
        hint = find_routing_hint(pending_request)
        seen = self._note_report(replica, self._get_curr_time_s()) if replica is not None else None
        routed = self._routed.setdefault(replica_id, {})
        # Its pages there: what the prompts of the requests routed there before it leave (not those still being
        # routed: in a burst they were ranked after it and counted on its prompt).
        _, credit = self._prefix_tokens(replica_id, hint, routed.values())
        report = seen.report if seen is not None else None
        routed[request_id] = _RoutedRequest(
            self._get_curr_time_s(),
            self._pages_of(hint, report, credit),
            _probe_keys(hint),
            self._pages_of(hint, report),
        )

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._tentative.pop(internal_request_id, None)
        routed = self._routed.get(replica_id)
        request = routed.pop(internal_request_id, None) if routed is not None else None
        now_s = self._get_curr_time_s()
        completed = self._completed.setdefault(replica_id, {})
        # Kept while a report that still lists it may be read: no longer than a report stays fresh.
        for request_id in [k for k, (at_s, _) in completed.items() if now_s - at_s > self._stats_max_age_s]:
            del completed[request_id]
        if request is not None and replica_id in self._replicas:
            completed[internal_request_id] = (now_s, request)
        elif request is None:
            unrouted = self._completed_unrouted
            for key in [k for k, at_s in unrouted.items() if now_s - at_s > COMPLETED_UNROUTED_TTL_S]:
                del unrouted[key]
            unrouted[(replica_id, internal_request_id)] = now_s

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        # Stats arrive with replica updates: note each new report when it arrives, by this router's clock.
        now_s = self._get_curr_time_s()
        for replica in replicas:
            self._note_report(replica, now_s)
        live = {r.replica_id for r in replicas}
        for table in (self._routed, self._completed, self._reports):
            for replica_id in [k for k in table if k not in live]:
                del table[replica_id]
