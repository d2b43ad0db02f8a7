"""vLLM-style Prometheus metrics of one engine replica, exported through Ray's metrics pipeline.

``ray.util.metrics`` instruments in every replica are pushed to the metrics agent of their node and
served on that node's ``metrics_export_port`` with a ``ray_`` prefix (e.g.
``ray_vllm_num_requests_running``); Prometheus discovers all nodes through Ray's service-discovery file,
and the ingress's ``/metrics`` endpoint gathers them from every node for a single scrape target.
Each sample is tagged with ``model_name`` and ``replica`` so per-replica series stay distinct.
"""

from __future__ import annotations

import threading

from ray.util.metrics import Counter, Gauge, Histogram

# Seconds; vLLM's buckets trimmed to what a CPU replica and a GPU replica both produce.
TTFT_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0]
ITL_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0]
E2E_BUCKETS_S = [0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0]

TAG_KEYS = ("model_name", "replica")


class EngineMetrics:
    """The replica's instruments; one instance per replica process."""

    def __init__(self, model_name: str, replica: str) -> None:
        tags = {"model_name": model_name, "replica": replica}

        def gauge(name: str, description: str) -> Gauge:
            g = Gauge(name, description=description, tag_keys=TAG_KEYS)
            g.set_default_tags(tags)
            return g

        def counter(name: str, description: str) -> Counter:
            c = Counter(name, description=description, tag_keys=TAG_KEYS)
            c.set_default_tags(tags)
            return c

        def histogram(name: str, description: str, buckets: list[float]) -> Histogram:
            h = Histogram(name, description=description, boundaries=buckets, tag_keys=TAG_KEYS)
            h.set_default_tags(tags)
            return h

        self.num_requests_running = gauge("vllm_num_requests_running", "Requests in the engine's running batch.")
        self.num_requests_waiting = gauge("vllm_num_requests_waiting", "Requests waiting for admission.")
        self.kv_cache_usage = gauge("vllm_kv_cache_usage_perc", "Fraction of physical KV pages in use (0..1).")
        self.num_free_pages = gauge("vattn_num_free_pages", "Free physical KV pages (incl. reclaimable).")
        self.num_mapped_pages = gauge("vattn_num_mapped_pages", "Physical KV pages mapped into the virtual cache.")
        self.num_total_pages = gauge("vattn_num_total_pages", "Physical KV pages in the pool.")
        self.num_preemptions = counter("vllm_num_preemptions_total", "Requests preempted (recomputed) so far.")
        self.prefix_cache_queries = counter(
            "vllm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache at admission."
        )
        self.prefix_cache_hits = counter("vllm_prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("vllm_prompt_tokens_total", "Prefilled prompt tokens.")
        self.generation_tokens = counter("vllm_generation_tokens_total", "Generated tokens.")
        self.request_success = counter("vllm_request_success_total", "Requests finished (any reason but abort).")
        self.time_to_first_token = histogram(
            "vllm_time_to_first_token_seconds", "Arrival at the replica to first output token.", TTFT_BUCKETS_S
        )
        self.inter_token_latency = histogram(
            "vllm_inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS_S
        )
        self.e2e_request_latency = histogram(
            "vllm_e2e_request_latency_seconds", "Arrival at the replica to the last token.", E2E_BUCKETS_S
        )
        # record_engine_stats() runs on the replica's event loop (gauge task) and in Serve's thread pool
        # (routing stats): the read-compare-increment of the counters fed from engine totals must not interleave.
        self._totals_lock = threading.Lock()
        self._totals = {"num_preemptions": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0}

    def record_engine_stats(self, stats: dict) -> None:
        """Update the gauges (and the preemption counter) from ``EngineStats.as_dict()``; thread-safe."""
        self.num_requests_running.set(stats["num_running"])
        self.num_requests_waiting.set(stats["num_waiting"])
        self.kv_cache_usage.set(stats["kv_usage"])
        self.num_free_pages.set(stats["num_free_pages"] + stats.get("num_reclaimable_pages", 0))
        self.num_mapped_pages.set(stats["num_mapped_pages"])
        self.num_total_pages.set(stats["num_total_pages"])
        with self._totals_lock:
            for name, last in self._totals.items():
                total = int(stats.get(name, 0))
                if total > last:
                    getattr(self, name).inc(total - last)
                    self._totals[name] = total
