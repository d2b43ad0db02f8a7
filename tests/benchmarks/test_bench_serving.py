"""bench_serving's figures: what could not be read is reported as missing, never as 0."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from benchmarks import bench_serving
from benchmarks.bench_serving import (
    FreePageSampler,
    RequestResult,
    metric_families,
    preemptions_between,
    print_summary,
    router_rankings,
    scrape_replicas,
    summarize,
)


def _metrics_text(replicas: list[str], preemptions: dict[str, float], free: dict[str, float] | None = None) -> str:
    """The ingress's /metrics: the replicas whose nodes it could scrape, their free pages and preemption
    counters."""
    pool = GaugeMetricFamily("ray_vattn_num_total_pages", "pages", labels=["model_name", "replica"])
    free_pages = GaugeMetricFamily("ray_vattn_num_free_pages", "pages", labels=["model_name", "replica"])
    for replica in replicas:
        pool.add_metric(["m", replica], 384.0)
        free_pages.add_metric(["m", replica], (free or {}).get(replica, 384.0))
    families = [pool, free_pages]
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
    _serve_metrics(monkeypatch, status, NO_PREEMPTION_YET)
    before = scrape_replicas("http://ingress", num_replicas=2)
    _serve_metrics(monkeypatch, status, text)
    by_replica = preemptions_between(before, scrape_replicas("http://ingress", num_replicas=2), {"r0", "r1"})
    assert (None if by_replica is None else sum(by_replica.values())) == expected


def test_free_page_spread_across_replicas(monkeypatch):
    # "old" is a deleted deployment's replica, whose last gauges Ray keeps exporting: it is not counted.
    free = {"r0": 96.0, "r1": 384.0, "old": 0.0}
    _serve_metrics(monkeypatch, 200, _metrics_text(["r0", "r1", "old"], {}, free=free))
    with FreePageSampler("http://ingress", num_replicas=2, period_s=0.01) as sampler:
        while len(sampler.samples) < 3:
            time.sleep(0.01)
    summary = sampler.summary({"r0", "r1"})
    assert summary["free_page_timeline"][0]["free_fraction"] == {"r0": 0.25, "r1": 1.0}
    assert summary["mean_free_fraction_spread"] == pytest.approx(0.75)
    _serve_metrics(monkeypatch, 200, ONE_REPLICA)  # a replica out of reach: the sample is missing, not 0
    with FreePageSampler("http://ingress", num_replicas=2, period_s=0.01) as sampler:
        while sampler.num_unread < 2:
            time.sleep(0.01)
    assert sampler.summary({"r0", "r1"})["mean_free_fraction_spread"] is None


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


def test_plot_marks_unread_figures(tmp_path):
    run = {"p50_ttft_ms": 80.0, "p99_ttft_ms": 300.0, "num_preemptions": None}
    timeline = [{"t_s": 1.0, "free_fraction": {"r0": 0.5, "r1": 0.9}}]
    runs = {"page_aware@6": {**run, "free_page_timeline": timeline}, "power_of_two@6": run}
    bench_serving.plot(runs, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_preemptions_count_only_the_replicas_that_served():
    before = {"r0": {"preemptions": 1.0}, "old": {"preemptions": 5.0}}
    after = {"r0": {"preemptions": 4.0}, "r1": {"preemptions": 2.0}, "old": {"preemptions": 9.0}}
    assert preemptions_between(before, after, {"r0", "r1"}) == {"r0": 3, "r1": 2}
    assert preemptions_between(before, after, {"r0", "r2"}) is None  # a replica that served was not read


def test_the_committed_router_config_is_the_one_measured():
    """deployments/configs/h100x4_router.yaml (+ the 2 x TP=2 override) holds the app args recorded with each
    layout of benchmarks/results/scale_h100x4.json, the router aside (the benchmark sets it per deployment)."""
    record = json.loads((bench_serving.REPO_ROOT / "benchmarks/results/scale_h100x4.json").read_text())
    config = str(bench_serving.REPO_ROOT / "deployments/configs/h100x4_router.yaml")
    for layout, override in (("4x1", None), ("2x2", '{"tensor_parallel_size": 2, "engine": {"num_replicas": 2}}')):
        app = bench_serving.load_app_args(config, override)
        del app["engine"]["router"]
        assert app == record["layouts"][layout]["app_args"]


def test_a_deleted_deployments_replicas_are_left_out_and_do_not_count_as_read(monkeypatch):
    _serve_metrics(monkeypatch, 200, _metrics_text(["r0", "old"], {"old": 4.0}))
    assert scrape_replicas("http://ingress", num_replicas=2) is not None
    assert scrape_replicas("http://ingress", num_replicas=2, exclude=frozenset({"old"})) is None  # r1 unread
    assert set(scrape_replicas("http://ingress", num_replicas=1, exclude=frozenset({"old"}))) == {"r0"}


def test_router_rankings_sum_over_ingress_replicas_and_are_missing_when_unread(monkeypatch):
    counter = CounterMetricFamily("ray_vattn_router_rankings", "rankings", labels=["tier", "WorkerId"])
    counter.add_metric(["roomy", "w1"], 5.0)
    counter.add_metric(["roomy", "w2"], 2.0)
    counter.add_metric(["short", "w2"], 1.0)

    class Collector:
        def collect(self):
            return iter([counter])

    _serve_metrics(monkeypatch, 200, generate_latest(Collector()).decode())
    assert router_rankings(metric_families("http://ingress")) == {"roomy": 7.0, "short": 1.0}
    _serve_metrics(monkeypatch, 200, NO_PREEMPTION_YET)
    assert router_rankings(metric_families("http://ingress")) == {}  # power of two: the router ranked nothing
    _serve_metrics(monkeypatch, 503)
    assert router_rankings(metric_families("http://ingress")) is None
