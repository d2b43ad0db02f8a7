"""Online serving benchmark against any OpenAI-compatible server (in the style of ``vllm bench serve``).

Poisson arrivals, random or ShareGPT-like lengths (or a skewed long/short mix), streaming completions;
reports request throughput, output tokens/s, TTFT / TPOT / ITL / E2E p50 / p99. A figure that could not
be read (no request produced it, or the replicas' metrics were out of reach) is reported as missing
(``null`` in the JSON, "n/a" in the table), never as 0.

Two modes:
  * client only:  ``bench_serving.py --base-url http://localhost:8000 --model smollm2``
  * router comparison (deploys the app itself on a Ray cluster, once per router, same workload):
    ``bench_serving.py --compare-routers --out benchmarks/results/router_cpu.json``
    runs the skewed workload on 2 CPU replicas with the page-aware router and with Ray Serve's default
    (power of two choices), and reports preemptions (from the replicas' Prometheus counters) and p99 TTFT
    for both, plus a PNG plot next to the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import current_commit  # noqa: E402
from deployments.serve_mode import use_serve_env  # noqa: E402


@dataclass
class RequestSpec:
    prompt_token_ids: list[int]
    max_tokens: int
    kind: str  # "long", "short", "random", "sharegpt"


@dataclass
class RequestResult:
    kind: str
    ok: bool
    status: int
    num_prompt_tokens: int
    num_output_tokens: int = 0
    ttft_s: float | None = None  # None: no output text arrived, so there is no first-token time
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    replica: str = ""
    error: str = ""
    in_band_error: bool = False  # the stream (status 200) was ended by an error event, not by a transport failure


# ---- workloads ------------------------------------------------------------------------------------


def workload_from_args(args: argparse.Namespace, kind: str) -> list:
    """``make_workload`` of ``kind`` with the command line's counts and lengths."""
    return make_workload(
        kind, args.num_prompts, args.seed, input_len=args.input_len, output_len=args.output_len, **skewed_lengths(args)
    )


def make_workload(
    kind: str,
    num_requests: int,
    seed: int,
    vocab_low: int = 1000,
    vocab_high: int = 30000,
    input_len: int = 128,
    output_len: int = 64,
    long_fraction: float = 0.25,
    long_input_len: int = 300,
    long_output_len: int = 120,
    short_input_len: int = 32,
    short_output_len: int = 24,
) -> list[RequestSpec]:
    """Token-id prompts of exact lengths (random ids from an ordinary-text id range)."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(vocab_low, vocab_high) for _ in range(n)]

    specs = []
    for _ in range(num_requests):
        if kind == "skewed":
            if rng.random() < long_fraction:
                specs.append(RequestSpec(ids(long_input_len), long_output_len, "long"))
            else:
                specs.append(RequestSpec(ids(short_input_len), short_output_len, "short"))
        elif kind == "sharegpt":
            # ShareGPT-like: log-normal lengths (median ~ input_len / output_len, long right tail).
            n_in = int(min(4 * input_len, max(4, rng.lognormvariate(np.log(input_len), 0.8))))
            n_out = int(min(4 * output_len, max(2, rng.lognormvariate(np.log(output_len), 0.8))))
            specs.append(RequestSpec(ids(n_in), n_out, "sharegpt"))
        else:  # random: uniform in [len/2, 3 len/2]
            n_in = rng.randint(max(1, input_len // 2), input_len * 3 // 2)
            n_out = rng.randint(max(1, output_len // 2), output_len * 3 // 2)
            specs.append(RequestSpec(ids(n_in), n_out, "random"))
    return specs


# ---- client ---------------------------------------------------------------------------------------


async def send_one(
    client: httpx.AsyncClient, base_url: str, model: str, spec: RequestSpec, on_headers=None
) -> RequestResult:
    """One streaming completion; ``on_headers(replica)`` is called once the response's headers name its replica."""
    body = {
        "model": model,
        "prompt": spec.prompt_token_ids,
        "max_tokens": spec.max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(spec.kind, False, 0, len(spec.prompt_token_ids))
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as resp:
            result.status = resp.status_code
            result.replica = resp.headers.get("x-vattn-replica", "")
            if on_headers is not None:
                on_headers(result.replica)
            if resp.status_code != 200:
                result.error = (await resp.aread()).decode()[:200]
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    result.error = payload["error"]["message"]
                    result.in_band_error = True
                    return result
                now = time.perf_counter()
                if payload.get("choices") and payload["choices"][0].get("text"):
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                if payload.get("usage"):
                    result.num_output_tokens = payload["usage"]["completion_tokens"]
        result.e2e_s = time.perf_counter() - start
        result.ok = result.num_output_tokens > 0
    except (httpx.HTTPError, ValueError, KeyError) as exc:  # transport failures; a malformed event
        result.error = repr(exc)
    return result


async def run_load(
    base_url: str, model: str, specs: list[RequestSpec], request_rate: float, seed: int, max_concurrency: int | None
) -> tuple[list[RequestResult], float]:
    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:

        async def guarded(spec: RequestSpec) -> RequestResult:
            if sem is None:
                return await send_one(client, base_url, model, spec)
            async with sem:
                return await send_one(client, base_url, model, spec)

        tasks = []
        start = time.perf_counter()
        for spec in specs:
            tasks.append(asyncio.create_task(guarded(spec)))
            if request_rate != float("inf"):
                await asyncio.sleep(float(rng.exponential(1.0 / request_rate)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


SLO_TTFT_S, SLO_TPOT_S = 2.0, 0.050


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.num_output_tokens for r in ok)
    in_tokens = sum(r.num_prompt_tokens for r in ok)

    def pct(values: list[float], p: float) -> float | None:
        return float(np.percentile(values, p) * 1000.0) if values else None

    timed = [r for r in ok if r.ttft_s is not None]
    ttft = [r.ttft_s for r in timed]
    tpot = [(r.e2e_s - r.ttft_s) / (r.num_output_tokens - 1) for r in timed if r.num_output_tokens > 1]
    itl = [x for r in ok for x in r.itl_s]
    e2e = [r.e2e_s for r in ok]
    # Goodput: requests that met the SLO (TTFT <= 2 s, TPOT <= 50 ms), per second.
    good = [
        r
        for r in timed
        if r.ttft_s <= SLO_TTFT_S
        and (r.num_output_tokens <= 1 or (r.e2e_s - r.ttft_s) / (r.num_output_tokens - 1) <= SLO_TPOT_S)
    ]
    summary = {
        "num_requests": len(results),
        "goodput_req_s": len(good) / duration_s,
        "slo_attainment": len(good) / len(results) if results else None,
        "num_completed": len(ok),
        "num_failed": len(results) - len(ok),
        "failures_by_status": {
            str(s): sum(1 for r in results if not r.ok and r.status == s)
            for s in sorted({r.status for r in results if not r.ok})
        },
        "error_samples": sorted({f"{r.status}: {r.error}" for r in results if not r.ok})[:3],
        "duration_s": duration_s,
        "request_throughput_per_s": len(ok) / duration_s,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "output_throughput_tok_s": out_tokens / duration_s,
        "total_token_throughput_tok_s": (in_tokens + out_tokens) / duration_s,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        summary[f"mean_{name}_ms"] = float(np.mean(values) * 1000.0) if values else None
        summary[f"p50_{name}_ms"] = pct(values, 50)
        summary[f"p99_{name}_ms"] = pct(values, 99)
    for kind in sorted({r.kind for r in ok}):
        kind_ttft = [r.ttft_s for r in timed if r.kind == kind]
        summary[f"p99_ttft_ms_{kind}"] = pct(kind_ttft, 99)
        summary[f"p50_ttft_ms_{kind}"] = pct(kind_ttft, 50)
    by_replica: dict[str, dict[str, int]] = {}
    for r in ok:
        by_replica.setdefault(r.replica, {}).setdefault(r.kind, 0)
        by_replica[r.replica][r.kind] += 1
    summary["requests_by_replica_and_kind"] = by_replica
    return summary


def _figure(value: float | None, spec: str = ">10.2f") -> str:
    """``value`` formatted for the table, or "n/a" when it could not be read."""
    return f"{'n/a':>10}" if value is None else format(value, spec)


def print_summary(title: str, s: dict) -> None:
    print(f"{'=' * 20} {title} {'=' * 20}")
    print(f"{'Successful requests:':<40}{s['num_completed']:>10}  (failed {s['num_failed']})")
    print(f"{'Benchmark duration (s):':<40}{s['duration_s']:>10.2f}")
    print(f"{'Request throughput (req/s):':<40}{s['request_throughput_per_s']:>10.2f}")
    print(f"{'Output token throughput (tok/s):':<40}{s['output_throughput_tok_s']:>10.2f}")
    print(f"{'Goodput (req/s within the SLO):':<40}{s['goodput_req_s']:>10.2f}")
    print(f"{'Total token throughput (tok/s):':<40}{s['total_token_throughput_tok_s']:>10.2f}")
    for name, label in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st)"),
        ("itl", "Inter-token Latency"),
        ("e2e", "End-to-end Latency"),
    ):
        print(f"{'-' * 10}{label}{'-' * 10}")
        for stat in ("mean", "p50", "p99"):
            print(f"{f'{stat.upper()} {name.upper()} (ms):':<40}{_figure(s[f'{stat}_{name}_ms'])}")
    if "num_preemptions" in s:
        print(f"{'Preemptions (all replicas):':<40}{_figure(s['num_preemptions'], '>10')}")
        print(f"{'Preemptions by replica:':<40}{s.get('preemptions_by_replica')}")
    if "mean_free_fraction_spread" in s:
        print(f"{'Free-page spread across replicas, mean:':<40}{_figure(s['mean_free_fraction_spread'], '>10.3f')}")
    print(f"{'Requests by replica and kind:':<40}{s['requests_by_replica_and_kind']}")


# ---- metrics --------------------------------------------------------------------------------------


def scrape_replicas(
    base_url: str, num_replicas: int, exclude: frozenset[str] = frozenset()
) -> dict[str, dict[str, float]] | None:
    """Per engine replica: its preemptions so far and its free and total physical KV pages, from the ingress's
    ``/metrics``; the replicas in ``exclude`` left out (those of a deleted deployment, whose last values Ray's
    exporter keeps reporting).

    None when it cannot be read: ``/metrics`` does not answer, or does not cover ``num_replicas``
    replicas (the ingress could not scrape a node's metrics port). A replica's counter is exported only
    once it has counted something, so the replicas are recognised by a gauge each of them always sets.
    """
    return replicas_in(metric_families(base_url), num_replicas, exclude)


def metric_families(base_url: str) -> dict | None:
    """The ingress's ``/metrics`` parsed, by family name; None when it cannot be read."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = httpx.get(f"{base_url}/metrics", timeout=30)
        resp.raise_for_status()
        return {fam.name: fam for fam in text_string_to_metric_families(resp.text)}
    except (httpx.HTTPError, ValueError):
        return None


def replicas_in(
    families: dict | None, num_replicas: int, exclude: frozenset[str] = frozenset()
) -> dict[str, dict[str, float]] | None:
    """``scrape_replicas`` of already read ``metric_families``."""
    if families is None:
        return None
    pool = families.get("ray_vattn_num_total_pages")
    live = {sample.labels.get("replica") for sample in pool.samples} - exclude if pool is not None else set()
    if len(live) < num_replicas:
        return None
    replicas: dict[str, dict[str, float]] = {}
    for family, key in (
        ("ray_vattn_num_total_pages", "total_pages"),
        ("ray_vattn_num_free_pages", "free_pages"),
        ("ray_vllm_num_preemptions", "preemptions"),
    ):
        fam = families.get(family)
        for sample in fam.samples if fam is not None else ():
            if key == "preemptions" and not sample.name.endswith("_total"):
                continue
            if sample.labels.get("replica", "") in live:
                replicas.setdefault(sample.labels.get("replica", ""), {"preemptions": 0.0})[key] = sample.value
    return replicas


def router_rankings(families: dict | None) -> dict[str, float] | None:
    """The page-aware router's rankings so far by the tier that decided them, summed over ingress replicas (from
    ``metric_families``); {} when it has ranked nothing (another router), None when it could not be read."""
    if families is None:
        return None
    tiers: dict[str, float] = {}
    fam = families.get("ray_vattn_router_rankings")
    for sample in fam.samples if fam is not None else ():
        if sample.name.endswith("_total"):
            tiers[sample.labels.get("tier", "")] = tiers.get(sample.labels.get("tier", ""), 0.0) + sample.value
    return tiers


def preemptions_between(before: dict | None, after: dict | None, replicas: set[str]) -> dict[str, int] | None:
    """Preemptions of each of ``replicas`` counted between two ``scrape_replicas`` reads; None if either could not
    be read or lacks one of them."""
    if before is None or after is None or not replicas <= after.keys():
        return None
    return {r: int(after[r]["preemptions"] - before.get(r, {}).get("preemptions", 0)) for r in sorted(replicas)}


class FreePageSampler:
    """Samples every replica's free physical KV pages through ``/metrics`` once per ``period_s`` while a run
    goes on (the replicas export their gauges once a second), so the spread across replicas over time can be
    plotted; a read that fails is skipped, and counted."""

    def __init__(
        self, base_url: str, num_replicas: int, period_s: float = 1.0, exclude: frozenset[str] = frozenset()
    ) -> None:
        self.base_url, self.num_replicas, self.period_s, self.exclude = base_url, num_replicas, period_s, exclude
        self.samples: list[dict] = []
        self.num_unread = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="free-page-sampler", daemon=True)

    def __enter__(self) -> FreePageSampler:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            replicas = scrape_replicas(self.base_url, self.num_replicas, self.exclude)
            if replicas is None or not all(v.get("total_pages") and "free_pages" in v for v in replicas.values()):
                self.num_unread += 1
                continue
            free = {r: v["free_pages"] / v["total_pages"] for r, v in replicas.items()}
            self.samples.append({"t_s": round(time.perf_counter() - self._start, 2), "free_fraction": free})

    def summary(self, replicas: set[str]) -> dict:
        return {"free_page_samples_unread": self.num_unread, **free_page_spread(self.samples, replicas)}


def free_page_spread(samples: list[dict], replicas: set[str]) -> dict:
    """The free-page timeline of ``replicas``, and its spread (max - min free fraction across them) at its mean
    and p90.

    Only the replicas named count (Ray's exporter keeps reporting the last values of a deleted deployment's
    replicas, whose pages read all free), and only samples that hold every one of them.
    """
    timeline = [
        {"t_s": s["t_s"], "free_fraction": {r: f for r, f in s["free_fraction"].items() if r in replicas}}
        for s in samples
    ]
    timeline = [s for s in timeline if replicas and len(s["free_fraction"]) == len(replicas)]
    spreads = [max(s["free_fraction"].values()) - min(s["free_fraction"].values()) for s in timeline]
    return {
        "free_page_timeline": timeline,
        "mean_free_fraction_spread": float(np.mean(spreads)) if spreads else None,
        "p90_free_fraction_spread": float(np.percentile(spreads, 90)) if spreads else None,
    }


# ---- router comparison ----------------------------------------------------------------------------


COMPARE_APP_ARGS = {
    "model": "smollm2",
    "device": "cpu",
    # A small page pool per replica so that placement matters: 24 MiB = 384 pages of 64 KiB =
    # 6.4 blocks of 85 tokens (30 layers x K,V per block): ~540 tokens of KV per replica.
    "engine_kwargs": {
        "max_batch_size": 8,
        "max_seq_len": 512,
        "kv_cache_memory_bytes": 24 << 20,
        "max_num_batched_tokens": 256,
    },
    "engine": {
        "num_replicas": 2,
        "num_cpus": 0,
        "max_ongoing_requests": 8,
        "max_queued_requests": 1000,
        "routing_stats_period_s": 0.5,
    },
    "ingress": {"num_cpus": 0, "max_queued_requests": 1000},
}


def deploy(app_args: dict, http_port: int, name: str = "bench") -> str:
    """Deploy the app of ``app_args`` as ``name`` on this Ray cluster; its base URL once ``/health`` answers."""
    from ray import serve

    from deployments.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": http_port, "request_timeout_s": 1800})
    serve.run(build_app(app_args), name=name, route_prefix="/")
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=15).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("app did not become healthy")


def _worker_pythonpath() -> str:
    return os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)


def start_local_ray(metrics_port: int | None, num_cpus: int = 2) -> None:
    """A fresh local Ray cluster (``num_cpus``, token auth off) whose workers import this checkout; its metrics
    exported on ``metrics_port`` (None: not exported). Serve runs on the app's data path
    (``deployments.serve_mode``) unless the environment sets its switches."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    use_serve_env(own_cluster=True)
    import ray

    metrics = {} if metrics_port is None else {"_metrics_export_port": metrics_port}
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        **metrics,
        _system_config={"metrics_report_interval_ms": 1000},
        # Workers import this checkout, and whatever the driver's PYTHONPATH holds (packages installed beside it).
        runtime_env={"env_vars": {"PYTHONPATH": _worker_pythonpath(), "RAY_AUTH_MODE": "disabled"}},
        logging_level="WARNING",
    )


def load_app_args(source: str | None, override: str | None = None) -> dict:
    """The app args to deploy: ``source`` is JSON, or a ``serve deploy`` YAML file (its first application's
    ``args``), or None (``COMPARE_APP_ARGS``); ``override`` (JSON) is merged into them key by key."""
    if source is None:
        app = copy.deepcopy(COMPARE_APP_ARGS)
    elif source.lstrip().startswith("{"):
        app = json.loads(source)
    else:
        import yaml

        app = yaml.safe_load(Path(source).read_text())["applications"][0]["args"]

    def merge(into: dict, update: dict) -> None:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(app, json.loads(override) if override else {})
    return app


def router_variant(name: str) -> dict:
    """The engine deployment's settings of a ``--routers`` entry: ``page_aware``, ``power_of_two``, or a router with
    options of the engine config, ``page_aware:roomy_free_page_fraction=0``."""
    router, _, options = name.partition(":")
    engine: dict = {"router": router}
    for option in filter(None, options.split(";")):
        key, _, value = option.partition("=")
        engine[key] = json.loads(value)
    return engine


def compare_routers(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    app_base = load_app_args(args.app_args, args.app_override)
    start_local_ray(args.metrics_port, os.cpu_count() if app_base.get("device") == "cuda" else 2)
    model = app_base.get("served_model_name") or app_base["model"]
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [args.request_rate]
    # One trace per rate (both routers get it; prompts of seed + i for the i-th rate), and the warm-up's
    # its own: the replicas' prefix caches keep what an earlier run left, and a run must not find its prompts there.
    specs_by_rate = [
        workload_from_args(argparse.Namespace(**{**vars(args), "seed": args.seed + i}), "skewed")
        for i in range(len(rates) + 1)
    ]
    warmup = specs_by_rate.pop()
    runs = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stale: frozenset[str] = frozenset()  # the replicas of the deployments deleted before this one
    for router in args.routers.split(","):
        app_args = copy.deepcopy(app_base)
        app_args["engine"].update(router_variant(router))
        base = deploy(app_args, args.http_port)
        # Warm-up: one short request per replica (first forward allocates buffers).
        num_replicas = app_base["engine"]["num_replicas"]
        asyncio.run(run_load(base, model, warmup[: 2 * num_replicas], float("inf"), args.seed, None))
        time.sleep(2.0)
        for rate, specs in zip(rates, specs_by_rate):
            families = metric_families(base)
            before, rankings_before = replicas_in(families, num_replicas, stale), router_rankings(families)
            with FreePageSampler(base, num_replicas, exclude=stale) as sampler:
                results, duration = asyncio.run(run_load(base, model, specs, rate, args.seed, None))
            time.sleep(3.0)  # counters reach the metrics export once per second
            summary = summarize(results, duration)
            families = metric_families(base)
            after, rankings_after = replicas_in(families, num_replicas, stale), router_rankings(families)
            rankings = (
                None
                if rankings_before is None or rankings_after is None
                else {t: int(v - rankings_before.get(t, 0)) for t, v in sorted(rankings_after.items())}
            )
            # A node whose metrics could not be read this time makes a count go back: not a figure.
            summary["router_rankings_by_tier"] = None if rankings and min(rankings.values()) < 0 else rankings
            # This deployment's replicas, those that served nothing included (Ray still exports a deleted one's).
            served = set(after or {}) or set(summary["requests_by_replica_and_kind"])
            by_replica = preemptions_between(before, after, served)
            summary["num_preemptions"] = None if by_replica is None else sum(by_replica.values())
            summary["preemptions_by_replica"] = by_replica
            summary.update(sampler.summary(served))
            summary["request_rate_per_s"] = rate
            label = router if len(rates) == 1 else f"{router}@{rate:g}"
            print_summary(f"router={label}", summary)
            runs[label] = summary
            write_record(args, app_base, runs, out)  # a run cut short keeps what it measured
        stale |= set(scrape_replicas(base, 0) or {})
        serve.delete("bench")
        time.sleep(2.0)
    serve.shutdown()
    ray.shutdown()
    print_table(runs)
    plot(runs, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def write_record(args: argparse.Namespace, app_base: dict, runs: dict, out: Path) -> None:
    record = {
        "benchmark": "bench_serving --compare-routers",
        "workload": {
            "kind": "skewed",
            "num_prompts": args.num_prompts,
            "request_rate_per_s": args.request_rate,
            "long_fraction": args.long_fraction,
            "long": [args.long_input_len, args.long_output_len],
            "short": [args.short_input_len, args.short_output_len],
            "seed": args.seed,
            "prompt_seeds": "seed + i for the i-th rate",
            "ignore_eos": True,
            "arrivals": "poisson",
        },
        "app_args": app_base,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "commit": current_commit(),
        "results": runs,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")


def print_table(runs: dict) -> None:
    """One line per (router, rate): the figures the router comparison is judged by."""
    cols = [
        ("request_throughput_per_s", "req/s", ".2f"),
        ("goodput_req_s", "goodput", ".2f"),
        ("output_throughput_tok_s", "out tok/s", ".0f"),
        ("p50_ttft_ms", "p50 TTFT", ".0f"),
        ("p99_ttft_ms", "p99 TTFT", ".0f"),
        ("p50_tpot_ms", "p50 TPOT", ".1f"),
        ("p99_tpot_ms", "p99 TPOT", ".1f"),
        ("p50_e2e_ms", "p50 E2E", ".0f"),
        ("num_preemptions", "preempt", "d"),
        ("mean_free_fraction_spread", "spread", ".2f"),
        ("num_failed", "failed", "d"),
    ]
    print(f"{'router@rate':<22}" + "".join(f"{title:>10}" for _, title, _ in cols))
    for label, s in runs.items():
        print(f"{label:<22}" + "".join(f"{'n/a':>10}" if s.get(k) is None else f"{s[k]:>10{f}}" for k, _, f in cols))


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(runs)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    metrics = [
        ("p50_ttft_ms", "p50 TTFT (ms)"),
        ("p99_ttft_ms", "p99 TTFT (ms)"),
        ("num_preemptions", "preemptions"),
    ]
    colors = ["tab:blue" if label.startswith("page_aware") else "tab:orange" for label in labels]
    for ax, (key, title) in zip(axes.flat, metrics):
        values = [runs[label].get(key) for label in labels]
        # A figure that could not be read is an empty slot marked n/a, not a measured 0.
        ax.bar(labels, [0 if v is None else v for v in values], color=colors)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=30)
        for i, v in enumerate(values):
            ax.text(i, v or 0, "n/a" if v is None else f"{v:.0f}", ha="center", va="bottom")
    ax = axes.flat[3]
    for label in labels:
        timeline = runs[label].get("free_page_timeline") or []
        spread = [max(s["free_fraction"].values()) - min(s["free_fraction"].values()) for s in timeline]
        style = "-" if label.startswith("page_aware") else "--"
        ax.plot([s["t_s"] for s in timeline], spread, style, label=label)
    ax.set_title("free-page spread across replicas (max - min free fraction)")
    ax.set_xlabel("s since the run's first request")
    ax.legend(fontsize=7)
    fig.suptitle("Page-aware vs default (power-of-two) router: skewed workload")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def skewed_lengths(args: argparse.Namespace) -> dict:
    """``make_workload``'s skewed-mix arguments from the command line of :func:`add_skewed_args`."""
    names = ("long_fraction", "long_input_len", "long_output_len", "short_input_len", "short_output_len")
    return {name: getattr(args, name) for name in names}


def add_skewed_args(p: argparse.ArgumentParser) -> None:
    """The skewed mix's lengths and the workload seed."""
    p.add_argument("--long-fraction", type=float, default=0.25)
    p.add_argument("--long-input-len", type=int, default=300)
    p.add_argument("--long-output-len", type=int, default=120)
    p.add_argument("--short-input-len", type=int, default=32)
    p.add_argument("--short-output-len", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://localhost:8000", help="OpenAI-compatible server")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dataset", choices=["random", "sharegpt", "skewed"], default="random")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson rate (req/s); inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    add_skewed_args(p)
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--compare-routers", action="store_true", help="deploy and compare page_aware vs power_of_two")
    p.add_argument(
        "--routers",
        default="page_aware,power_of_two",
        help="the routers --compare-routers deploys, in turn: page_aware, power_of_two, or one with engine options "
        "('page_aware:roomy_free_page_fraction=0'; several joined by ';')",
    )
    p.add_argument(
        "--app-args",
        default=None,
        help="app args for --compare-routers: JSON, or a serve config YAML file (default: 2 CPU replicas)",
    )
    p.add_argument("--app-override", default=None, help="JSON merged into the app args, key by key")
    p.add_argument("--rates", default=None, help="comma-separated Poisson rates for --compare-routers")
    p.add_argument("--http-port", type=int, default=8011)
    p.add_argument("--metrics-port", type=int, default=8091)
    args = p.parse_args()
    if args.compare_routers:
        compare_routers(args)
        return
    specs = workload_from_args(args, args.dataset)
    results, duration = asyncio.run(
        run_load(args.base_url, args.model, specs, args.request_rate, args.seed, args.max_concurrency)
    )
    summary = summarize(results, duration)
    print_summary(f"{args.dataset} @ {args.request_rate} req/s", summary)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "results": summary, "commit": current_commit()}, indent=2, default=str)
            + "\n"
        )


if __name__ == "__main__":
    main()
