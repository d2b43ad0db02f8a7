"""Soak and fault tests on a local 2-replica cluster (one cluster for the module).

Soak: SOAK_REQUESTS mixed requests (chat / completions, streamed or not), SOAK_CONCURRENCY at a time,
every fifth one cancelled by the client mid-stream. Every other request must complete; afterwards no
replica holds a slot or a request, every page is free or reclaimable, and replica RSS stays flat.

    CI size (default):  .venv/bin/python -m pytest tests/deployments/test_soak.py
    full size:          SOAK_REQUESTS=2000 .venv/bin/python -m pytest tests/deployments/test_soak.py   (make soak)

Faults: an engine replica is killed mid-load; its streams end with an error (no hang), Serve replaces
it, and requests sent meanwhile still succeed. The API key comes from the VATTN_API_KEY environment
variable of the replicas here (the config-field path is tested in test_validation.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
import pytest
import ray
from ray import serve

from deployments.app import ENGINE_DEPLOYMENT_NAME, replica_actor_names
from deployments.ingress import REPLICA_HEADER
from tests.deployments.serve_harness import APP_NAME, MODEL, served_app

SOAK_REQUESTS = int(os.environ.get("SOAK_REQUESTS", "300"))
SOAK_CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "12"))
API_KEY = "soak-env-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BATCH_SIZE = 8
# RSS may grow while the page pool gets touched and allocators warm up; a leak of even 50 KB per
# request would exceed this over the full soak.
RSS_GROWTH_LIMIT_BYTES = 96 << 20

APP_ARGS = {
    "model": MODEL,
    "device": "cpu",
    "engine_kwargs": {
        "max_batch_size": MAX_BATCH_SIZE,
        "max_seq_len": 512,
        "kv_cache_memory_bytes": 32 << 20,
        "max_num_batched_tokens": 256,
    },
    "engine": {
        "num_replicas": 2,
        "num_cpus": 0,
        "max_ongoing_requests": MAX_BATCH_SIZE,
        "max_queued_requests": 256,
        "routing_stats_period_s": 0.3,
        "health_check_period_s": 1.0,
    },
    "ingress": {"num_cpus": 0, "retry_after_s": 1},
}

PROMPTS = [
    "Tell me about the sea.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "List three colours:",
    "def add(a, b):",
    "Émojis 🎉 and accents: café. Continue:",
]


@pytest.fixture(scope="module")
def app():
    with served_app(APP_ARGS, headers=AUTH, env_vars={"VATTN_API_KEY": API_KEY}) as served:
        yield served


def _sse_data(line: str) -> dict | None:
    if not line.startswith("data: "):
        return None
    data = line[len("data: ") :]
    return {"done": True} if data == "[DONE]" else json.loads(data)


async def _one_request(ac: httpx.AsyncClient, i: int, rng: random.Random) -> str:
    """Run request ``i``; returns "cancelled" or "completed" (raises on any wrong answer)."""
    chat = i % 2 == 0
    cancel = i % 5 == 0
    stream = cancel or rng.random() < 0.5
    max_tokens = 64 if cancel else rng.randint(2, 10)
    prompt = rng.choice(PROMPTS)
    body = {"model": MODEL, "max_tokens": max_tokens, "stream": stream, "temperature": rng.choice([0, 0.8])}
    if cancel:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    if not stream:
        r = await ac.post(path, json=body)
        assert r.status_code == 200, (i, r.status_code, r.text)
        out = r.json()
        assert out["choices"][0]["finish_reason"] in ("stop", "length"), out
        assert 0 < out["usage"]["completion_tokens"] <= max_tokens, out
        return "completed"
    async with ac.stream("POST", path, json=body) as r:
        assert r.status_code == 200, (i, r.status_code, await r.aread())
        events = []
        async for line in r.aiter_lines():
            event = _sse_data(line)
            if event is None:
                continue
            assert "error" not in event, (i, event)
            events.append(event)
            if cancel and len(events) >= 3:
                return "cancelled"  # leaving the block closes the connection mid-stream
    assert events and events[-1] == {"done": True}, (i, events[-3:])
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-1] if e.get("choices")]
    assert finishes[-1] in ("stop", "length"), (i, events[-3:])
    return "completed"


def _rss_by_pid(app) -> dict[int, int]:
    return {s["pid"]: s["rss_bytes"] for s in app.engine_stats_by_replica().values()}


def test_soak_with_client_cancellations_leaves_nothing_behind(app):
    rng = random.Random(1234)
    results: dict[str, int] = {"completed": 0, "cancelled": 0}
    rss_samples: list[dict[int, int]] = []
    warmup = max(SOAK_REQUESTS // 5, 20)
    start = time.time()

    async def run():
        sem = asyncio.Semaphore(SOAK_CONCURRENCY)
        done = 0

        async with httpx.AsyncClient(base_url=app.base_url, headers=AUTH, timeout=120) as ac:

            async def guarded(i):
                nonlocal done
                async with sem:
                    outcome = await _one_request(ac, i, rng)
                results[outcome] += 1
                done += 1
                if done in (warmup, SOAK_REQUESTS // 2 + warmup // 2):
                    rss_samples.append(await asyncio.to_thread(_rss_by_pid, app))

            await asyncio.gather(*(guarded(i) for i in range(SOAK_REQUESTS)))

    asyncio.run(run())
    elapsed = time.time() - start
    stats = app.wait_engines_idle(timeout_s=60)
    rss_samples.append(_rss_by_pid(app))
    print(
        f"\nsoak: {SOAK_REQUESTS} requests in {elapsed:.1f}s ({SOAK_REQUESTS / elapsed:.1f} req/s), {results}; "
        f"RSS MiB per replica pid: {[{p: v >> 20 for p, v in s.items()} for s in rss_samples]}"
    )

    assert results == {"cancelled": (SOAK_REQUESTS + 4) // 5, "completed": SOAK_REQUESTS - (SOAK_REQUESTS + 4) // 5}
    assert len(stats) == 2
    for s in stats.values():
        assert s["num_inflight"] == s["num_running"] == s["num_waiting"] == 0, s
        assert s["num_free_slots"] == s["max_batch_size"] == MAX_BATCH_SIZE, s
        # No page is mapped to a live (let alone finished) request: all free or reclaimable.
        assert s["num_free_pages"] + s["num_reclaimable_pages"] == s["num_total_pages"], s
    warm, final = rss_samples[0], rss_samples[-1]
    assert set(warm) == set(final), "a replica restarted during the soak"
    for pid in warm:
        assert final[pid] - warm[pid] < RSS_GROWTH_LIMIT_BYTES, (pid, warm[pid] >> 20, final[pid] >> 20)


def test_killing_a_replica_mid_load_fails_its_streams_cleanly_and_serve_recovers(app):
    app.wait_engines_idle()
    before = app.engine_stats_by_replica()
    assert len(before) == 2
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 150, "ignore_eos": True, "stream": True}

    async def run():
        async with httpx.AsyncClient(base_url=app.base_url, headers=AUTH, timeout=60) as ac:
            started: dict[int, str] = {}
            all_started = asyncio.Event()

            async def stream(k):
                async with ac.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    started[k] = r.headers[REPLICA_HEADER]
                    if len(started) == 6:
                        all_started.set()
                    events = []
                    async for line in r.aiter_lines():
                        event = _sse_data(line)
                        if event is not None:
                            events.append(event)
                    return started[k], events

            tasks = [asyncio.create_task(stream(k)) for k in range(6)]
            await asyncio.wait_for(all_started.wait(), 60)
            await asyncio.sleep(0.5)
            victim = started[0]
            names = replica_actor_names()
            (victim_actor,) = [n for rid, n in names.items() if rid in victim or victim in n]
            ray.kill(ray.get_actor(victim_actor, namespace="serve"), no_restart=True)
            kill_time = time.time()
            # New requests right after the kill succeed (routed again away from the dead replica).
            fresh = []
            for _ in range(8):
                r = await ac.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
                fresh.append(r)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
            return victim, results, fresh, time.time() - kill_time

    victim, results, fresh, ended_after_s = asyncio.run(run())
    on_victim = [events for replica, events in results if replica == victim]
    on_other = [events for replica, events in results if replica != victim]
    assert on_victim
    for events in on_victim:
        # Ended early with an in-band OpenAI error (the status line was long sent), not [DONE].
        assert events and "error" in events[-1], events[-2:]
        assert events[-1]["error"]["type"] == "server_overloaded"
    for events in on_other:
        assert events[-1] == {"done": True}
    assert [r.status_code for r in fresh] == [200] * len(fresh), [r.text for r in fresh]
    assert all(r.headers[REPLICA_HEADER] != victim for r in fresh)
    assert ended_after_s < 60

    # Serve replaces the replica: two healthy replicas again, one of them new.
    deadline = time.time() + 120
    while True:
        status = serve.status().applications[APP_NAME].deployments[ENGINE_DEPLOYMENT_NAME]
        running = status.replica_states.get("RUNNING", 0)
        if status.status == "HEALTHY" and running == 2:
            stats = app.engine_stats_by_replica()
            if len(stats) == 2 and victim not in stats:
                break
        assert time.time() < deadline, status
        time.sleep(1)
    for _ in range(4):
        r = httpx.post(
            f"{app.base_url}/v1/completions",
            json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
            headers=AUTH,
            timeout=60,
        )
        assert r.status_code == 200, r.text
    assert httpx.get(f"{app.base_url}/v1/models", timeout=30).status_code == 401  # env-var API key holds
