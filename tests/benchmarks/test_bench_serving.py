"""bench_serving's figures: what could not be read is reported as missing, never as 0."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from benchmarks import bench_serving
from benchmarks.bench_serving import RequestResult, print_summary, scrape_preemptions, summarize


def _metrics_text(replicas: list[str], preemptions: dict[str, float]) -> str:
    """The ingress's /metrics: the replicas whose nodes it could scrape, and their preemption counters."""
    pool = GaugeMetricFamily("ray_vattn_num_total_pages", "pages", labels=["model_name", "replica"])
    for replica in replicas:
        pool.add_metric(["m", replica], 384.0)
    families = [pool]
    if preemptions:  # Ray exports no counter until its first increment
        counter = CounterMetricFamily("ray_vllm_num_preemptions", "preemptions", labels=["model_name", "replica"])
        for replica, count in preemptions.items():
            counter.add_metric(["m", replica], count)
        families.append(counter)

    class Collector:
        def collect(self):
            return iter(families)

    return generate_latest(Collector()).decode()


ONE_REPLICA = _metrics_text(["r0"], {"r0": 3.0})  # the other replica's node could not be scraped
BOTH_REPLICAS = _metrics_text(["r0", "r1"], {"r0": 3.0, "r1": 2.0})
NO_PREEMPTION_YET = _metrics_text(["r0", "r1"], {})


def _serve_metrics(monkeypatch, status: int, text: str = "") -> None:
    def get(url: str, **kwargs) -> httpx.Response:
        return httpx.Response(status, text=text, request=httpx.Request("GET", url))

    monkeypatch.setattr(bench_serving.httpx, "get", get)


@pytest.mark.parametrize(
    "status,text,expected",
    [
        (200, ONE_REPLICA, None),
        (503, "", None),
        (200, "", None),
        (200, NO_PREEMPTION_YET, 0),
        (200, BOTH_REPLICAS, 5),
    ],
)
def test_preemptions_are_missing_unless_every_replica_was_read(monkeypatch, status, text, expected):
    _serve_metrics(monkeypatch, status, text)
    assert scrape_preemptions("http://ingress", num_replicas=2) == expected


def test_unread_first_token_times_are_missing(capsys):
    # A request that finished without any output text has no first-token time.
    results = [RequestResult("short", True, 200, 10, num_output_tokens=3, e2e_s=0.5)]
    summary = summarize(results, duration_s=1.0)
    assert summary["p50_ttft_ms"] is None and summary["p99_tpot_ms"] is None
    assert summary["p50_e2e_ms"] == pytest.approx(500.0)
    print_summary("t", {**summary, "num_preemptions": None})
    out = capsys.readouterr().out
    assert "P50 TTFT (ms):" in out and "Preemptions (all replicas):" in out
    assert [line.split()[-1] for line in out.splitlines() if "TTFT" in line and ":" in line] == ["n/a"] * 3
