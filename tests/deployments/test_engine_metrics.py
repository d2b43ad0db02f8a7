"""The replica's Prometheus instruments, outside a Ray cluster (``ray.util.metrics`` records nowhere)."""

from __future__ import annotations

import threading
import time

from deployments.engine_metrics import EngineMetrics

STATS = {
    "num_running": 1,
    "num_waiting": 0,
    "kv_usage": 0.5,
    "num_free_pages": 8,
    "num_reclaimable_pages": 0,
    "num_mapped_pages": 8,
    "num_total_pages": 16,
    "num_preemptions": 5,
}


class SlowCounter:
    """Records increments; each takes a while, as a real export may, widening any race."""

    def __init__(self) -> None:
        self.total = 0

    def inc(self, value: float = 1.0) -> None:
        time.sleep(0.05)
        self.total += value


def test_preemptions_counted_once_when_two_threads_record_the_same_stats():
    metrics = EngineMetrics("tiny", "replica-0")
    metrics.num_preemptions = SlowCounter()
    # The gauge task (event loop) and the routing-stats call (Serve's thread pool) see the same 5.
    threads = [threading.Thread(target=metrics.record_engine_stats, args=(STATS,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert metrics.num_preemptions.total == 5
    metrics.record_engine_stats({**STATS, "num_preemptions": 7})
    assert metrics.num_preemptions.total == 7


def test_prefix_cache_counters_follow_the_engine_totals():
    metrics = EngineMetrics("tiny", "replica-0")
    metrics.prefix_cache_queries, metrics.prefix_cache_hits = SlowCounter(), SlowCounter()
    metrics.record_engine_stats({**STATS, "prefix_cache_queries": 900, "prefix_cache_hits": 512})
    metrics.record_engine_stats({**STATS, "prefix_cache_queries": 900, "prefix_cache_hits": 512})
    metrics.record_engine_stats({**STATS, "prefix_cache_queries": 1400, "prefix_cache_hits": 768})
    assert (metrics.prefix_cache_queries.total, metrics.prefix_cache_hits.total) == (1400, 768)
