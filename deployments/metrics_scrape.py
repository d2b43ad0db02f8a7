"""The ingress's ``/metrics``: every engine replica's metrics, scraped from each Ray node's export."""

from __future__ import annotations

import logging
import urllib.request

import ray

from deployments.metrics_merge import merge_prometheus_texts

logger = logging.getLogger("ray.serve")

# Families gathered by /metrics from every node's Ray metrics export (see engine_metrics.py).
METRIC_PREFIXES = ("ray_vllm_", "ray_vattn_")


def scrape_ray_nodes() -> list[str]:
    """Prometheus text from the metrics export port of every alive Ray node."""
    texts = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        url = f"http://{node['NodeManagerAddress']}:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                texts.append(resp.read().decode("utf-8", errors="replace"))
        except OSError as exc:
            logger.warning("cannot scrape %s: %s", url, exc)
    return texts


def scrape_engine_metrics() -> bytes:
    """One Prometheus exposition of the engine families (``METRIC_PREFIXES``) of every alive node (blocking)."""
    return merge_prometheus_texts(scrape_ray_nodes(), METRIC_PREFIXES)
