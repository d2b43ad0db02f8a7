"""What an engine replica tells the page-aware router about itself, every ``routing_stats_period_s``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RoutingReport:
    """One replica's report. Serve carries it as a dict (``as_dict``, returned by
    ``EngineDeployment.record_routing_stats``); the router reads it back with ``from_dict``.

    Attributes:
        healthy: False once the engine died: it then reports no free pages or slots, so it can take nothing.
        num_free_pages: physical KV pages free now, reclaimable ones (held by finished requests' slots) included.
        num_total_pages: pages in the pool.
        tokens_per_page / pages_per_token_block: how tokens become pages (``routing_hint.pages_for_tokens``).
        num_reserved_pages: what the requests this replica already accepted will still claim: the whole footprint
            (prompt + max_tokens) of those not yet started, the remaining growth of running ones, and the pages that
            preempted ones gave back and will take again.
        num_running / num_waiting: the engine's batch and its queue.
        num_free_slots: request slots free in the cache.
        num_preemptions: preemptions so far.
        accepted_request_ids: Serve's ids of the requests counted above: the router counts what it routed here
            that the report does not include yet.
        report_seq: grows by one per report, so the router ages reports by its own clock.
        prefix_keys: the engine's prefix summary (``engine.prefix_summary``), for prefix affinity; empty when the
            engine caches no prefixes.
        replica: the replica's tag (logs, metrics).
    """

    healthy: bool
    num_free_pages: int
    num_total_pages: int
    tokens_per_page: float
    pages_per_token_block: int
    num_reserved_pages: int
    num_running: int
    num_waiting: int
    accepted_request_ids: tuple[str, ...]
    report_seq: int
    num_free_slots: int = 0
    num_preemptions: int = 0
    prefix_keys: tuple[int, ...] = ()
    replica: str = ""

    @functools.cached_property
    def accepted(self) -> frozenset[str]:
        """``accepted_request_ids`` as a set, made once per report (the router looks ids up at every decision)."""
        return frozenset(self.accepted_request_ids)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, stats: Mapping[str, Any] | None) -> RoutingReport | None:
        """The report in ``stats``; None when there is none yet or it lacks a field the router needs (a replica of
        another version)."""
        if not stats:
            return None
        try:
            return cls(
                healthy=bool(stats["healthy"]),
                num_free_pages=int(stats["num_free_pages"]),
                num_total_pages=int(stats["num_total_pages"]),
                tokens_per_page=float(stats["tokens_per_page"]),
                pages_per_token_block=int(stats["pages_per_token_block"]),
                num_reserved_pages=int(stats["num_reserved_pages"]),
                num_running=int(stats["num_running"]),
                num_waiting=int(stats["num_waiting"]),
                accepted_request_ids=tuple(stats["accepted_request_ids"]),
                report_seq=int(stats["report_seq"]),
                num_free_slots=int(stats.get("num_free_slots", 0)),
                num_preemptions=int(stats.get("num_preemptions", 0)),
                prefix_keys=tuple(stats.get("prefix_keys") or ()),
                replica=str(stats.get("replica", "")),
            )
        except (KeyError, TypeError, ValueError):
            return None
