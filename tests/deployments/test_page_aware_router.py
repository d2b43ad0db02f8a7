"""Unit tests of the page-aware router's ranking and accounting, with in-memory replicas (no Ray cluster).

Pages: every fake replica has a pool of 1000 pages, 100 tokens per page and 1 page per block, so a
request of N tokens (prompt + max_tokens) needs ceil(N / 100) pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata  # noqa: E402
from ray.serve.request_router import PendingRequest, RunningReplica  # noqa: E402

from deployments.page_aware_router import PageAwareRequestRouter, Tier  # noqa: E402
from deployments.routing_hint import RoutingHint  # noqa: E402
from deployments.routing_report import RoutingReport  # noqa: E402
from engine.block_hashes import block_hashes  # noqa: E402
from engine.prefix_summary import prefix_probe, summary_positions  # noqa: E402

DEPLOYMENT_ID = DeploymentID(name="EngineDeployment", app_name="llm")
TOTAL_PAGES = 1000
# The loop the router's calls run on; a PendingRequest's future belongs to it.
LOOP = asyncio.new_event_loop()


@pytest.fixture(scope="module", autouse=True)
def _close_loop():
    yield
    LOOP.close()


class FakeReplica(RunningReplica):
    """What the router reads of a replica: its id, its routing stats and its queue length."""

    def __init__(self, name: str, max_ongoing_requests: int = 8) -> None:
        self._replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT_ID)
        self._max_ongoing_requests = max_ongoing_requests
        self.stats: dict = {}
        self.queue_len = 0

    def report(
        self,
        free_pages: int,
        *,
        reserved_pages: int = 0,
        accepted: tuple[str, ...] = (),
        healthy: bool = True,
        num_running: int = 0,
        **extra,
    ) -> None:
        """A new routing-stats report, as ``EngineDeployment.record_routing_stats()`` writes it (plus any field
        of ``extra`` that a report does not have, such as a replica's clock: the router must not need it)."""
        fields = {f.name for f in dataclasses.fields(RoutingReport)}
        self.stats = RoutingReport(
            healthy=healthy,
            num_free_pages=free_pages,
            num_total_pages=TOTAL_PAGES,
            tokens_per_page=100.0,
            pages_per_token_block=1,
            num_reserved_pages=reserved_pages,
            num_running=num_running,
            num_waiting=0,
            accepted_request_ids=tuple(accepted),
            report_seq=self.stats.get("report_seq", 0) + 1,
            **{k: v for k, v in extra.items() if k in fields},
        ).as_dict() | {k: v for k, v in extra.items() if k not in fields}

    @property
    def replica_id(self) -> ReplicaID:
        return self._replica_id

    @property
    def routing_stats(self) -> dict:
        return self.stats

    @property
    def max_ongoing_requests(self) -> int:
        return self._max_ongoing_requests

    @property
    def node_id(self) -> str:
        return ""

    @property
    def availability_zone(self) -> None:
        return None

    @property
    def multiplexed_model_ids(self) -> set[str]:
        return set()

    def push_proxy_handle(self, handle) -> None:
        pass

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


class Clock:
    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def make_router(replicas: list[FakeReplica], clock: Clock | None = None, **kwargs) -> PageAwareRequestRouter:
    """A router that knows ``replicas`` (and has probed their queue lengths), as Serve hands them over."""
    router = PageAwareRequestRouter(
        DEPLOYMENT_ID,
        DeploymentHandleSource.REPLICA,
        use_replica_queue_len_cache=True,
        get_curr_time_s=clock or Clock(),
    )
    router.initialize_state(**kwargs)

    async def update() -> None:
        router.update_replicas(replicas)
        await asyncio.sleep(0.01)  # the router probes new replicas' queue lengths in a task

    LOOP.run_until_complete(update())
    return router


def request(request_id: str, num_tokens: int, num_sequences: int = 1) -> PendingRequest:
    """A pending ``generate`` call whose request needs ``num_sequences * ceil(num_tokens / 100)`` pages."""
    metadata = RequestMetadata(request_id=request_id, internal_request_id=request_id, call_method="generate")
    return PendingRequest(
        args=[RoutingHint(num_prompt_tokens=num_tokens, max_tokens=0, num_sequences=num_sequences)],
        kwargs={},
        metadata=metadata,
        future=LOOP.create_future(),
    )


def choose(router: PageAwareRequestRouter, replicas: list[FakeReplica], pending: PendingRequest) -> list[list[str]]:
    ranks = LOOP.run_until_complete(router.choose_replicas(replicas, pending))
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def scores(router: PageAwareRequestRouter, replicas: list[FakeReplica], num_tokens: int) -> dict[str, tuple]:
    """``{replica: (tier, predicted free pages)}`` for a request of ``num_tokens`` tokens, now."""
    hint = RoutingHint(num_prompt_tokens=num_tokens, max_tokens=0)
    now_s = router._get_curr_time_s()
    return {
        r.replica_id.unique_id: (s.tier, s.predicted_free_pages)
        for r, s in ((r, router.score_replica(r, hint, now_s)) for r in replicas)
    }


# ---- dead engines ----------------------------------------------------------------------------------


def test_unhealthy_replica_gets_nothing_while_others_exist():
    dead, full, ok = FakeReplica("dead"), FakeReplica("full"), FakeReplica("ok")
    # The dead engine's report: no pages; a live one nearly full, one with room.
    dead.report(0, healthy=False)
    full.report(50, num_running=8)
    ok.report(600)
    router = make_router([dead, full, ok])
    ranks = choose(router, [dead, full, ok], request("r1", 10_000))  # needs 100 pages: fits only on "ok"
    assert ranks[0] == ["ok"] and all("dead" not in rank for rank in ranks), ranks
    # Only dead replicas left: still ranked, so the request fails fast rather than hanging.
    assert choose(router, [dead], request("r2", 100)) == [["dead"]]


# ---- no report, no hint ----------------------------------------------------------------------------


def test_without_reports_two_replicas_come_in_either_order():
    """With no fresh report (or a call without a hint) the router falls back to power of two, and Serve takes the
    first of a rank's shortest queues: two replicas in a fixed order would give every tie to the first."""
    a, b = FakeReplica("a"), FakeReplica("b")  # never reported
    router = make_router([a, b])
    firsts = {choose(router, [a, b], request(f"r{i}", 100))[0][0] for i in range(40)}
    assert firsts == {"a", "b"}


# ---- retries ---------------------------------------------------------------------------------------


def test_request_routed_again_does_not_count_against_itself():
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(450)
    b.report(400)
    router = make_router([a, b], roomy_free_page_fraction=1.0)  # rank by pages alone
    pending = request("r1", 10_000)  # 100 pages
    assert choose(router, [a, b], pending)[0] == ["a"]  # 350 left vs 300
    # Every rank was full: Serve asks again for the same request. "a" is still the better place.
    assert choose(router, [a, b], pending)[0] == ["a"]
    # The ingress retries a request after its replica died: its routed entry does not count either.
    router.on_request_routed(pending, a.replica_id, None)
    assert choose(router, [a, b], pending)[0] == ["a"]


# ---- stats lag -------------------------------------------------------------------------------------


def test_routed_requests_count_until_a_report_lists_them_whatever_the_replica_clock():
    a, b = FakeReplica("a"), FakeReplica("b")
    # Reports stamped by a replica clock two minutes ahead of the router's: the router must not use the stamp.
    skewed_s = 1000.0 + 120.0
    a.report(500, timestamp_s=skewed_s)
    b.report(400, timestamp_s=skewed_s)
    router = make_router([a, b], roomy_free_page_fraction=1.0)
    first = request("r1", 30_000)  # 300 pages
    assert choose(router, [a, b], first)[0] == ["a"]
    router.on_request_routed(first, a.replica_id, None)
    # A new report from "a" taken before r1 started there: it does not list r1.
    a.report(500, timestamp_s=skewed_s + 1)
    assert scores(router, [a], 30_000)["a"] == (Tier.SHORT, 500 - 300 - 300)
    assert choose(router, [a, b], request("r2", 30_000))[0] == ["b"]
    # Once a report lists r1, its pages are in the report's reserved pages: not counted twice.
    a.report(500, reserved_pages=300, accepted=("r1",), timestamp_s=skewed_s + 2)
    assert scores(router, [a], 30_000)["a"] == (Tier.SHORT, 500 - 300 - 300)


def test_a_report_taken_before_a_request_completed_does_not_hold_its_pages_after():
    a = FakeReplica("a")
    a.report(1000)
    router = make_router([a], roomy_free_page_fraction=1.0)
    first = request("r1", 30_000)  # 300 pages
    choose(router, [a], first)
    router.on_request_routed(first, a.replica_id, None)
    # Taken while r1 ran: 200 pages of its prompt mapped, 100 more reserved for its output.
    a.report(800, reserved_pages=100, accepted=("r1",))
    assert scores(router, [a], 100)["a"] == (Tier.TIGHT, 800 - 100 - 1)
    router.on_request_completed(a.replica_id, "r1")
    # Still the last report, but r1 is done: its pages are free again (or reclaimable, cached).
    assert scores(router, [a], 100)["a"] == (Tier.TIGHT, 800 - 100 + 300 - 1)
    a.report(1000)  # the next report: r1 gone, nothing to add back
    assert scores(router, [a], 100)["a"] == (Tier.TIGHT, 1000 - 1)


def test_a_request_that_completes_before_its_routing_is_recorded_leaves_no_pages_behind():
    """Serve can run a request's completion callback before the router's on_request_routed (a stream that ends
    or fails at once): the late routing record must not count its pages as on their way to the replica for good."""
    a = FakeReplica("a")
    a.report(1000)
    router = make_router([a], roomy_free_page_fraction=1.0)
    first = request("r1", 30_000)  # 300 pages
    choose(router, [a], first)
    router.on_request_completed(a.replica_id, "r1")
    router.on_request_routed(first, a.replica_id, None)
    a.report(1000)  # later reports never list r1: it is done
    assert scores(router, [a], 100)["a"] == (Tier.TIGHT, 1000 - 1)


def test_reports_age_by_the_router_clock():
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(900, timestamp_s=0.0)  # a replica clock far behind the router's: the report is still new
    b.report(100, timestamp_s=0.0)
    clock = Clock()
    router = make_router([a, b], clock, stats_max_age_s=30.0, roomy_free_page_fraction=1.0)
    assert choose(router, [a, b], request("r1", 100)) == [["a"], ["b"]]
    clock.now_s += 31.0  # "a" keeps reporting, "b" stopped 31 s ago
    a.report(900)
    assert scores(router, [a, b], 100) == {"a": (Tier.TIGHT, 899.0), "b": (Tier.UNKNOWN, float("-inf"))}


# ---- ranking: queue length where pages are plentiful ------------------------------------------------


def test_roomy_replicas_rank_by_queue_so_the_shorter_queue_wins():
    a, b, c, d = FakeReplica("a"), FakeReplica("b"), FakeReplica("c"), FakeReplica("d")
    a.report(900)  # roomy, busy
    b.report(500)  # roomy, idle
    c.report(150)  # fits, but under the 20% headroom
    d.report(50)  # does not fit
    router = make_router([a, b, c, d])
    router.on_new_queue_len_info(a.replica_id, 6)
    router.on_new_queue_len_info(b.replica_id, 1)
    ranks = choose(router, [a, b, c, d], request("r1", 10_000))  # 100 pages
    # The shorter queue first: "b", though "a" has more free pages.
    assert ranks == [["b"], ["a"], ["c"], ["d"]]
    # The request being routed counts against "b", the replica Serve will likely take.
    assert scores(router, [a, b], 10_000) == {"a": (Tier.ROOMY, 800.0), "b": (Tier.ROOMY, 300.0)}


def test_tight_replicas_rank_by_pages_whatever_their_queues():
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(250)
    b.report(200)
    router = make_router([a, b])
    router.on_new_queue_len_info(a.replica_id, 7)
    router.on_new_queue_len_info(b.replica_id, 0)
    assert choose(router, [a, b], request("r1", 10_000)) == [["a"], ["b"]]  # 150 and 100 left: < 20%


def test_where_the_request_fits_nowhere_the_shortest_queue_wins_not_the_pages():
    """At saturation every replica is short (its queue's reserved growth exceeds its pool): the request waits for
    pages wherever it goes, so queues decide, as with Serve's default router."""
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(300, reserved_pages=250)
    b.report(100, reserved_pages=90)
    router = make_router([a, b])
    set_queues(router, {a: 9, b: 3})
    assert {r: s[0] for r, s in scores(router, [a, b], 10_000).items()} == {"a": Tier.SHORT, "b": Tier.SHORT}
    assert choose(router, [a, b], request("r0", 10_000)) == [["b", "a"]]  # one rank, the shorter queue first


def test_a_request_of_n_sequences_needs_the_pages_of_n():
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(350)
    b.report(450)
    router = make_router([a, b], roomy_free_page_fraction=0.0)
    router.on_new_queue_len_info(a.replica_id, 0)
    router.on_new_queue_len_info(b.replica_id, 5)
    # One sequence of 100 pages fits both: the shorter queue wins. Four of them fit only "b".
    assert choose(router, [a, b], request("r1", 10_000)) == [["a"], ["b"]]
    assert choose(router, [a, b], request("r4", 10_000, num_sequences=4)) == [["b"], ["a"]]


@pytest.mark.parametrize("kwargs", [{"roomy_free_page_fraction": 1.5}, {"stats_max_age_s": 0}, {"bogus": 1}])
def test_bad_router_kwargs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        make_router([], **kwargs)


def test_a_burst_routed_at_once_spreads_over_roomy_replicas():
    """Requests ranked before any of them is routed: Serve's queue lengths have not moved, the router's count of the
    requests it is placing right now has."""
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(900)
    b.report(900)
    router = make_router([a, b])
    router.on_new_queue_len_info(a.replica_id, 1)
    router.on_new_queue_len_info(b.replica_id, 0)
    firsts = [choose(router, [a, b], request(f"r{i}", 1_000))[0][0] for i in range(4)]
    assert firsts[0] == "b" and sorted(firsts) == ["a", "a", "b", "b"], firsts


def queue_lens(router: PageAwareRequestRouter, replicas: list[FakeReplica]) -> dict[str, int]:
    now_s = router._get_curr_time_s()
    return {r.replica_id.unique_id: router.score_replica(r, RoutingHint(1_000, 0), now_s).queue_len for r in replicas}


def serve_sends(router: PageAwareRequestRouter, pending: PendingRequest, replica: FakeReplica) -> None:
    """What Serve does once a replica is chosen: hands it to the request through its future, sends it and counts it
    in its queue-length cache."""
    pending.future.set_result(replica)
    router.on_send_request(replica.replica_id)
    LOOP.run_until_complete(asyncio.sleep(0))  # the future's callbacks run


def test_a_request_sent_counts_once_in_its_queue_until_its_answer_comes_back():
    """From Serve's send of a request its queue-length cache counts it (on_send_request); the router's count of
    requests being placed must stop counting it then, not only once the replica's answer arrives."""
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(900)
    b.report(900)
    router = make_router([a, b])
    set_queues(router, {a: 2, b: 3})
    first = request("r0", 1_000)
    assert choose(router, [a, b], first)[0] == ["a"]
    assert queue_lens(router, [a, b]) == {"a": 3, "b": 3}  # ranked, not sent: the router counts it
    serve_sends(router, first, a)  # Serve's cache: a at 3
    assert queue_lens(router, [a, b]) == {"a": 3, "b": 3}  # once, not twice
    router.on_new_queue_len_info(a.replica_id, 3)  # the replica accepted it
    router.on_request_routed(first, a.replica_id, None)
    assert queue_lens(router, [a, b]) == {"a": 3, "b": 3}


def test_a_request_sent_elsewhere_than_ranked_first_counts_where_it_went():
    """Serve may send a request to another replica than the one ranked first (the first was full, or a grouped rank):
    its pages and its place in the queue follow it there."""
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(900)
    b.report(900)
    router = make_router([a, b])
    set_queues(router, {a: 0, b: 0})
    pending = request("r0", 10_000)  # 100 pages
    first = choose(router, [a, b], pending)[0][0]
    other = b if first == "a" else a
    serve_sends(router, pending, other)
    free = scores(router, [a, b], 100)
    assert free[other.replica_id.unique_id][1] == 900 - 100 - 1 and free[first][1] == 900 - 1
    assert queue_lens(router, [a, b]) == {first: 0, other.replica_id.unique_id: 1}


def test_a_request_cancelled_before_it_was_sent_counts_nowhere():
    a = FakeReplica("a")
    a.report(900)
    router = make_router([a])
    set_queues(router, {a: 0})
    pending = request("r0", 10_000)
    choose(router, [a], pending)
    pending.future.cancel()
    LOOP.run_until_complete(asyncio.sleep(0))
    assert queue_lens(router, [a]) == {"a": 0} and scores(router, [a], 100)["a"][1] == 900 - 1


class Tally:
    """Stands in for the router's Prometheus counter: what it was incremented with."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        tier = (tags or {})["tier"]
        self.counts[tier] = self.counts.get(tier, 0) + int(value)


def test_each_ranking_counts_the_tier_that_decided_it():
    roomy, tight = FakeReplica("roomy"), FakeReplica("tight")
    roomy.report(900)
    tight.report(150)
    router = make_router([roomy, tight])
    router._rankings = tally = Tally()
    choose(router, [roomy, tight], request("r0", 1_000))  # 10 pages: roomy fits with room to spare
    choose(router, [tight], request("r1", 1_000))  # 140 of 1,000 left: a tight fit
    choose(router, [tight], request("r2", 100_000))  # 1,000 pages: fits nowhere now
    new = FakeReplica("new")
    fresh = make_router([new])  # no report yet: power of two choices
    fresh._rankings = tally
    choose(fresh, [new], request("r3", 1_000))
    assert tally.counts == {"roomy": 1, "tight": 1, "short": 1, "no_stats": 1}


# ---- prefix affinity ----------------------------------------------------------------------------------------

BLOCK_TOKENS = 100
SEED = 7
SYSTEM = list(range(1000, 1000 + 16 * BLOCK_TOKENS))  # a shared 16-block system prompt


def holding(*prompts: list[int]) -> list[int]:
    """``prefix_keys`` of a replica that cached ``prompts``: their blocks' keys at the summary positions."""
    keys = []
    for prompt in prompts:
        hashes = block_hashes(prompt, BLOCK_TOKENS, SEED)
        keys += [hashes[p] for p in summary_positions(len(hashes))]
    return keys


def prompt_request(request_id: str, prompt: list[int], max_tokens: int = 100) -> PendingRequest:
    metadata = RequestMetadata(request_id=request_id, internal_request_id=request_id, call_method="generate")
    hint = RoutingHint(len(prompt), max_tokens, prefix_probe=prefix_probe(prompt, BLOCK_TOKENS, SEED))
    return PendingRequest(args=[hint], kwargs={}, metadata=metadata, future=LOOP.create_future())


def set_queues(router: PageAwareRequestRouter, queue_lens: dict[FakeReplica, int]) -> None:
    for replica, queue_len in queue_lens.items():
        router.on_new_queue_len_info(replica.replica_id, queue_len)


def cached_tokens(router: PageAwareRequestRouter, replicas: list[FakeReplica], prompt: list[int]) -> dict[str, int]:
    hint = RoutingHint(len(prompt), 100, prefix_probe=prefix_probe(prompt, BLOCK_TOKENS, SEED))
    now_s = router._get_curr_time_s()
    return {r.replica_id.unique_id: router.score_replica(r, hint, now_s).cached_tokens for r in replicas}


def test_a_prompt_goes_where_its_prefix_is_cached_within_the_queue_slack():
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(900, prefix_keys=[])
    b.report(800, prefix_keys=holding(SYSTEM + [1] * 50))
    router = make_router([a, b])
    set_queues(router, {a: 0, b: 3})
    question = SYSTEM + [5] * 30
    # 16 blocks are cached on "b": the probe finds 16 (position 15); "a" holds none of it.
    assert cached_tokens(router, [a, b], question) == {"a": 0, "b": 16 * BLOCK_TOKENS}
    assert choose(router, [a, b], prompt_request("r1", question)) == [["b"], ["a"]]
    # A prompt that shares nothing with it: the shorter queue, as without prefix affinity.
    assert choose(router, [a, b], prompt_request("r2", [9] * 500)) == [["a"], ["b"]]


def test_the_prefix_loses_to_a_queue_longer_than_the_slack():
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(900)
    b.report(900, prefix_keys=holding(SYSTEM + [1]))
    router = make_router([a, b], prefix_queue_slack=2)
    set_queues(router, {a: 1, b: 4})
    assert choose(router, [a, b], prompt_request("r1", SYSTEM + [5] * 30)) == [["a"], ["b"]]


def test_the_prefix_loses_to_a_replica_short_of_pages():
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(900)
    b.report(100 + 18 + 10, prefix_keys=holding(SYSTEM + [1]))  # after 18 pages, 110 left: under 20% of 1000
    router = make_router([a, b])
    set_queues(router, {a: 3, b: 0})
    question = SYSTEM + [5] * 30  # 1630 + 100 tokens: 18 pages
    assert scores(router, [b], 1730)["b"][0] == Tier.TIGHT
    assert choose(router, [a, b], prompt_request("r1", question)) == [["a"], ["b"]]


def test_the_longest_cached_prefix_wins_a_multi_turn_conversation():
    a, b, c = FakeReplica("a"), FakeReplica("b"), FakeReplica("c")
    turn1 = SYSTEM + [3] * 700
    turn2 = turn1 + [4] * 800  # the history, the answer and the next question
    a.report(900, prefix_keys=holding(SYSTEM + [2] * 300))  # the system prompt only, for another user
    b.report(900, prefix_keys=holding(turn1))  # this conversation's first turn
    c.report(900)
    router = make_router([a, b, c])
    set_queues(router, {a: 0, b: 2, c: 1})
    assert cached_tokens(router, [a, b, c], turn2) == {"a": 16 * BLOCK_TOKENS, "b": 16 * BLOCK_TOKENS, "c": 0}
    # Positions 0..15 match on both; turn1's 23 blocks end before position 23. Deeper probes tell them apart:
    turn3 = turn2 + [6] * 1000
    b.report(900, prefix_keys=holding(turn2))  # 31 blocks: position 23 is there now
    assert cached_tokens(router, [a, b, c], turn3) == {"a": 16 * BLOCK_TOKENS, "b": 24 * BLOCK_TOKENS, "c": 0}
    assert choose(router, [a, b, c], prompt_request("t3", turn3)) == [["b"], ["a"], ["c"]]


def test_a_prompt_routed_but_not_reported_yet_counts_as_cached_where_it_went():
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(900)
    b.report(900)
    router = make_router([a, b])
    set_queues(router, {a: 0, b: 0})
    first = prompt_request("r1", SYSTEM + [1] * 40)
    where = choose(router, [a, b], first)[0][0]
    replica = {"a": a, "b": b}[where]
    router.on_request_routed(first, replica.replica_id, None)
    set_queues(router, {replica: 1})
    # The next question with the same system prompt follows the first, though no report lists its blocks yet.
    assert choose(router, [a, b], prompt_request("r2", SYSTEM + [2] * 40))[0] == [where]
    for request_id in ("r1", "r2"):
        router.on_request_completed(replica.replica_id, request_id)
    assert cached_tokens(router, [replica], SYSTEM + [3] * 40) == {where: 0}  # finished, and still unreported


def test_a_prefix_only_reported_earns_no_pages():
    """A replica's report lists the prompt's first 16 blocks, but they may be idle cached blocks the report already
    counts as free (reclaimable): mapping them takes them from there, so the request is counted whole (18 pages), and
    among tight replicas the one with more pages still comes first."""
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(190)
    b.report(180, prefix_keys=holding(SYSTEM + [1] * 50))
    router = make_router([a, b])
    question = SYSTEM + [5] * 30  # 1630 + 100 tokens: 18 pages
    hint = RoutingHint(len(question), 100, prefix_probe=prefix_probe(question, BLOCK_TOKENS, SEED))
    now_s = router._get_curr_time_s()
    scored = {r.replica_id.unique_id: router.score_replica(r, hint, now_s) for r in (a, b)}
    assert {k: (s.tier, s.predicted_free_pages, s.cached_tokens) for k, s in scored.items()} == {
        "a": (Tier.TIGHT, 190 - 18, 0),
        "b": (Tier.TIGHT, 180 - 18, 16 * BLOCK_TOKENS),
    }
    assert choose(router, [a, b], prompt_request("r1", question)) == [["a"], ["b"]]


def test_questions_sent_after_their_system_prompt_count_only_their_own_pages():
    """A burst of questions on one system prompt, ranked before any report lists them: the first is counted with its
    18 pages, each later one, routed or still being routed, with the 2 its prompt's cached prefix does not cover, so
    the replica that computes the system prompt stays the better place for the rest of the burst."""
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(215)
    b.report(240)
    router = make_router([a, b])
    questions = [prompt_request(f"r{i}", SYSTEM + [i] * 30) for i in range(4)]
    assert choose(router, [a, b], questions[0])[0] == ["b"]
    router.on_request_routed(questions[0], b.replica_id, None)
    for question in questions[1:3]:
        assert choose(router, [a, b], question)[0] == ["b"]  # still being routed: tentative
    router.on_request_routed(questions[1], b.replica_id, None)
    hint = questions[3].args[0]
    now_s = router._get_curr_time_s()
    # The system prompt once (16 pages), then 2 pages for each question: r0, r1 (routed), r2 (tentative), r3.
    assert router.score_replica(b, hint, now_s).predicted_free_pages == 240 - 16 - 4 * 2
    assert router.score_replica(a, hint, now_s).predicted_free_pages == 215 - 18
    assert choose(router, [a, b], questions[3])[0] == ["b"]


def test_a_burst_ranked_before_any_of_it_is_routed_counts_its_prompt_once():
    """Four questions on one system prompt all ranked, then routed in order: the first carries the prompt's pages
    (18), each later one its own 2, at every moment (none takes credit from a request ranked after it)."""
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(215)
    b.report(240)
    router = make_router([a, b])
    questions = [prompt_request(f"r{i}", SYSTEM + [i] * 30) for i in range(4)]
    assert [choose(router, [a, b], q)[0] for q in questions] == [["b"]] * 4
    probe = prompt_request("r9", SYSTEM + [9] * 30).args[0]
    for routed in range(5):
        now_s = router._get_curr_time_s()
        assert router.score_replica(b, probe, now_s).predicted_free_pages == 240 - 18 - 4 * 2, routed
        if routed < 4:
            router.on_request_routed(questions[routed], b.replica_id, None)


def test_a_burst_sharing_a_prompt_gives_back_all_it_was_counted_for_once_finished():
    """A report taken while three questions on one system prompt were prefilling counts the pages they hold (the
    prompt once, 2 each) and each one's whole footprint reserved until its first token (18). Once the router has
    seen them finish, that report must not keep the replica short: each gives back the 18 the report reserved for
    it, not the 2 pages it was charged (what they held comes back with the next report)."""
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(300)
    b.report(300)
    router = make_router([a, b])
    questions = [prompt_request(f"r{i}", SYSTEM + [i] * 30) for i in range(3)]
    for question in questions:
        choose(router, [a, b], question)
        router.on_request_routed(question, a.replica_id, None)
    accepted = tuple(q.metadata.internal_request_id for q in questions)
    a.report(300 - 16 - 3 * 2, reserved_pages=3 * 18, accepted=accepted)  # none has its first token yet
    probe = prompt_request("r9", [7] * 1700).args[0]  # another prompt: 18 pages anywhere
    now_s = router._get_curr_time_s()
    assert router.score_replica(a, probe, now_s).predicted_free_pages == 300 - 16 - 6 - 54 - 18
    for question in questions:
        router.on_request_completed(a.replica_id, question.metadata.internal_request_id)
    assert router.score_replica(a, probe, now_s).predicted_free_pages == 300 - 16 - 6 - 18


def test_what_finished_requests_give_back_never_exceeds_the_pool_nor_hides_new_ones():
    """A report taken after three questions on one system prompt started counts the prompt once (16 pages) and each
    question's 2; once they finish, each gives back its whole 18, 54 in all: more than they held. The pool caps that,
    and requests routed since (not in the report) still count against what is left."""
    a = FakeReplica("a")
    a.report(1000)
    router = make_router([a])
    questions = [prompt_request(f"r{i}", SYSTEM + [i] * 30) for i in range(3)]
    for question in questions:
        choose(router, [a], question)
        router.on_request_routed(question, a.replica_id, None)
    a.report(1000 - 16 - 3 * 2, reserved_pages=3, accepted=tuple(q.metadata.internal_request_id for q in questions))
    for question in questions:
        router.on_request_completed(a.replica_id, question.metadata.internal_request_id)
    for i in range(2):  # routed before the next report: 18 pages each
        new = prompt_request(f"n{i}", [20 + i] * 1700)
        choose(router, [a], new)
        router.on_request_routed(new, a.replica_id, None)
    probe = prompt_request("r9", [7] * 1700).args[0]
    assert router.score_replica(a, probe, router._get_curr_time_s()).predicted_free_pages == 1000 - 2 * 18 - 18


def test_a_short_common_prefix_does_not_pull_requests_together():
    a, b = FakeReplica("a"), FakeReplica("b")
    template = SYSTEM[: 2 * BLOCK_TOKENS]  # the first tokens of every chat: cached wherever a chat ran
    a.report(900)
    b.report(900, prefix_keys=holding(template + [1] * 300))
    router = make_router([a, b])  # prefix_min_cached_tokens=256
    set_queues(router, {a: 0, b: 1})
    assert cached_tokens(router, [a, b], template + [2] * 300) == {"a": 0, "b": 0}
    assert choose(router, [a, b], prompt_request("r1", template + [2] * 300)) == [["a"], ["b"]]


def test_without_prefix_affinity_queues_decide_as_before():
    a, b = FakeReplica("a"), FakeReplica("b")
    a.report(900)
    b.report(900, prefix_keys=holding(SYSTEM + [1]))
    router = make_router([a, b], prefix_affinity=False)
    set_queues(router, {a: 0, b: 1})
    assert cached_tokens(router, [a, b], SYSTEM + [5] * 30) == {"a": 0, "b": 0}
    assert choose(router, [a, b], prompt_request("r1", SYSTEM + [5] * 30)) == [["a"], ["b"]]


@pytest.mark.parametrize(
    "kwargs",
    [{"prefix_queue_slack": -1}, {"prefix_queue_slack": 1.5}, {"prefix_affinity": 1}, {"prefix_min_cached_tokens": 0}],
)
def test_bad_prefix_kwargs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        make_router([], **kwargs)


def test_a_report_reads_back_as_written_and_an_incomplete_one_not_at_all():
    report = RoutingReport(True, 10, 100, 16.0, 1, 2, 3, 4, ("a",), 7, prefix_keys=(5, 6), replica="r")
    assert RoutingReport.from_dict(report.as_dict()) == report
    incomplete = report.as_dict()
    del incomplete["num_reserved_pages"]  # a replica of another version
    assert RoutingReport.from_dict(incomplete) is None
    assert RoutingReport.from_dict({**report.as_dict(), "num_free_pages": None}) is None
    assert RoutingReport.from_dict({}) is None
