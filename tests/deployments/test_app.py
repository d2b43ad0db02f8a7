"""End-to-end tests of the Serve app: a real local Ray cluster, 2 engine replicas with the embedded
SmolLM2 model, real HTTP. One cluster and one app for the whole module (start-up dominates)."""

from __future__ import annotations

import asyncio
import json
import os
import time

os.environ["RAY_AUTH_MODE"] = "disabled"

import httpx  # noqa: E402
import openai  # noqa: E402
import pytest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from deployments.app import ENGINE_DEPLOYMENT_NAME  # noqa: E402
from deployments.ingress import REPLICA_HEADER  # noqa: E402
from deployments.serve_mode import sync_handle  # noqa: E402
from tests.deployments.serve_harness import APP_NAME, MODEL, served_app  # noqa: E402

# 64 KiB host pages, SmolLM2 float32: 85.3 tokens per page, 60 pages (30 layers x K,V) per block of
# 85 tokens; a 16 MiB pool per replica is 256 pages = 4 blocks of 85 tokens... too small: use 64 MiB
# (1024 pages = 17 blocks, ~1450 tokens per replica) so page differences are visible but requests fit.
APP_ARGS = {
    "model": MODEL,
    "device": "cpu",
    "engine_kwargs": {
        "max_batch_size": 4,
        "max_seq_len": 1024,
        "kv_cache_memory_bytes": 64 << 20,
        "max_num_batched_tokens": 256,
    },
    "engine": {
        "num_replicas": 2,
        "num_cpus": 0,
        "max_ongoing_requests": 4,
        "max_queued_requests": 8,
        "routing_stats_period_s": 0.3,
    },
    "ingress": {"num_cpus": 0, "retry_after_s": 2},
}


@pytest.fixture(scope="module")
def server():
    """Base URL of the running app; tears the cluster down after the module."""
    with served_app(APP_ARGS) as app:
        yield app.base_url


def _chat_body(content: str, max_tokens: int = 8, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    body.update(extra)
    return body


def _engine_stats_by_replica() -> dict[str, dict]:
    """Stats of every engine replica (calls go through the router's random fallback; poll until both)."""
    handle = sync_handle(ENGINE_DEPLOYMENT_NAME, APP_NAME)
    seen: dict[str, dict] = {}
    for _ in range(40):
        stats = handle.engine_stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats
        if len(seen) == 2:
            break
    return seen


def _wait_engines_idle(timeout_s: float = 20.0) -> dict[str, dict]:
    deadline = time.time() + timeout_s
    while True:
        stats = _engine_stats_by_replica()
        if all(s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_inflight"] == 0 for s in stats.values()):
            return stats
        if time.time() > deadline:
            return stats
        time.sleep(0.3)


def _sse_events(lines) -> list[dict]:
    events = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            events.append({"done": True})
        else:
            events.append(json.loads(data))
    return events


# ---- OpenAI surface ---------------------------------------------------------------------------------


def test_models_and_health(server):
    r = httpx.get(f"{server}/v1/models", timeout=30)
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == [MODEL]
    assert data[0]["max_model_len"] == 1024
    assert httpx.get(f"{server}/health", timeout=30).json() == {"status": "ok"}


def test_chat_completion_http(server):
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json=_chat_body("What is the capital of France?", max_tokens=12, temperature=0),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5 and 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_repeated_long_prompt_reports_the_cached_prompt_tokens(server):
    """The second or third time a prompt longer than a cache block arrives, some replica holds its blocks: the
    prefill starts after them, and usage says how many (OpenAI's ``prompt_tokens_details.cached_tokens``)."""
    content = "Summarize the following notes. " + " ".join(f"Note {i}: the river rose {i} cm." for i in range(60))
    usages = []
    for _ in range(3):
        r = httpx.post(f"{server}/v1/chat/completions", json=_chat_body(content, max_tokens=2), timeout=120)
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    assert usages[0]["prompt_tokens"] > 300
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert max(u["prompt_tokens_details"]["cached_tokens"] for u in usages[1:]) >= 256
    stats = _engine_stats_by_replica()
    assert sum(s["prefix_cache_hits"] for s in stats.values()) >= 256


def test_chat_completion_streaming_http(server):
    with httpx.stream(
        "POST",
        f"{server}/v1/chat/completions",
        json=_chat_body(
            "Count: one, two,",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            ignore_eos=True,
        ),
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r.iter_lines())
    assert events[-1] == {"done": True}
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals and finals[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_completion_http_stream_and_not(server):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    full = r.json()
    assert full["object"] == "text_completion"
    assert full["usage"]["completion_tokens"] <= 5
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        events = _sse_events(s.iter_lines())
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    # Greedy: the streamed text equals the non-streamed one.
    assert streamed == full["choices"][0]["text"]


def test_openai_client(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=5,
        stream=True,
        temperature=0,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces)
    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert comp.choices[0].text and comp.usage.completion_tokens <= 4
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_n_seeded_samples_over_http(server):
    """n=4 at temperature 1 with a seed: 4 distinct choices, the same 4 again, the prompt counted once."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    prompt = "Once upon a time"
    kwargs = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": 42}
    kwargs["extra_body"] = {"ignore_eos": True}  # 12 tokens each
    comp = client.completions.create(n=4, **kwargs)
    assert [c.index for c in comp.choices] == [0, 1, 2, 3]
    texts = [c.text for c in comp.choices]
    assert len(set(texts)) == 4
    assert [c.text for c in client.completions.create(n=4, **kwargs).choices] == texts
    # Choice i is the request seeded with seed + i.
    assert client.completions.create(**{**kwargs, "seed": 43}).choices[0].text == texts[1]
    one = client.completions.create(n=1, **kwargs)
    assert comp.usage.prompt_tokens == one.usage.prompt_tokens
    assert comp.usage.completion_tokens == 4 * 12
    assert comp.usage.total_tokens == comp.usage.prompt_tokens + comp.usage.completion_tokens

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a joke."}],
        max_tokens=10,
        n=4,
        temperature=1.0,
        seed=7,
    )
    assert [c.index for c in chat.choices] == [0, 1, 2, 3] and len({c.message.content for c in chat.choices}) == 4


def test_n_streams_every_choice_with_its_index(server):
    body = _chat_body(
        "Tell me a joke.",
        max_tokens=10,
        n=4,
        temperature=1.0,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
        ignore_eos=True,
    )
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = _sse_events(r.iter_lines())
    assert events[-1] == {"done": True}
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(len(c["choices"]) == 1 for c in chunks)
    choices = [c["choices"][0] for c in chunks]
    assert sorted(c["index"] for c in choices if c["delta"].get("role") == "assistant") == [0, 1, 2, 3]
    assert sorted(c["index"] for c in choices if c["finish_reason"]) == [0, 1, 2, 3]
    streamed = ["".join(c["delta"].get("content", "") for c in choices if c["index"] == i) for i in range(4)]
    # The same seeded request, not streamed, gives the same 4 texts.
    full = httpx.post(f"{server}/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert streamed == [c["message"]["content"] for c in full["choices"]] and len(set(streamed)) == 4
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] == 4 * 10 and usage == full["usage"]


def test_json_object_response_format_over_http(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France? Reply with a JSON object."}]
    free = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0)
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=60, temperature=0, response_format={"type": "json_object"}
    )
    assert free.choices[0].message.content.startswith("```json")  # unconstrained, not parsable JSON
    assert chat.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(chat.choices[0].message.content), dict)


# ---- errors, overload ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/chat/completions", _chat_body("hi", temperature=5.0), 400, "temperature"),
        ("/v1/chat/completions", _chat_body("hi", top_p=0), 400, "top_p"),
        ("/v1/chat/completions", _chat_body("hi", n=17), 400, "n"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/v1/chat/completions", _chat_body("word " * 1100), 400, "messages"),
        ("/v1/chat/completions", _chat_body("hi", max_tokens=5000), 400, "max_tokens"),
        ("/v1/chat/completions", {**_chat_body("hi"), "model": "gpt-17"}, 404, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    r = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]


def test_bad_json_then_server_keeps_serving(server):
    r = httpx.post(
        f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 400 and "error" in r.json()
    ok = httpx.post(f"{server}/v1/chat/completions", json=_chat_body("hi", max_tokens=2), timeout=60)
    assert ok.status_code == 200


def test_overload_answers_503_with_retry_after(server):
    # 2 replicas x 4 ongoing + 8 queued: a flood of 40 must be partly rejected, fast, never hang.
    async def flood():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 3, "ignore_eos": True}
            return await asyncio.gather(*(client.post(f"{server}/v1/completions", json=body) for _ in range(40)))

    start = time.time()
    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected and codes.count(200) >= 8
    assert all(r.headers.get("retry-after") == "2" for r in rejected)
    assert all(r.json()["error"]["type"] == "server_overloaded" for r in rejected)
    assert time.time() - start < 90
    assert (
        httpx.post(
            f"{server}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60
        ).status_code
        == 200
    )


# ---- disconnect, routing ---------------------------------------------------------------------------


def _start_long_stream(server: str, prompt_words: int, max_tokens: int):
    """Open a streaming request that runs for a while; returns (client, response, replica)."""
    client = httpx.Client(timeout=60)
    req = client.build_request(
        "POST",
        f"{server}/v1/completions",
        json={
            "model": MODEL,
            "prompt": "word " * prompt_words,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
        },
    )
    resp = client.send(req, stream=True)
    assert resp.status_code == 200
    return client, resp, resp.headers[REPLICA_HEADER]


def _replica_gauge(server: str, name: str) -> dict[str, float]:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {s.labels["replica"]: s.value for s in family.samples}
    return {}


def _wait_gauge(server: str, name: str, replica: str, value: float, timeout_s: float = 20.0) -> None:
    deadline = time.time() + timeout_s
    while _replica_gauge(server, name).get(replica) != value:
        assert time.time() < deadline, (name, replica, _replica_gauge(server, name))
        time.sleep(0.3)


def test_disconnect_mid_stream_frees_engine_slot(server):
    _wait_engines_idle()
    client, resp, replica = _start_long_stream(server, prompt_words=20, max_tokens=800)
    lines = resp.iter_lines()  # keep the iterator: closing it would close the connection
    assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: ")) >= 3
    # The replica's own gauges (through Ray's metrics export) see the request running ...
    _wait_gauge(server, "ray_vllm_num_requests_running", replica, 1.0)
    resp.close()
    client.close()
    # ... and see it gone soon after the client hung up, long before its 800 tokens could finish.
    _wait_gauge(server, "ray_vllm_num_requests_running", replica, 0.0)
    _wait_gauge(server, "ray_vllm_num_requests_waiting", replica, 0.0)
    stats = _wait_engines_idle()
    for s in stats.values():
        assert s["num_inflight"] == 0 and s["num_free_slots"] == s["max_batch_size"]


def test_new_requests_avoid_replica_with_fewer_free_pages(server):
    _wait_engines_idle()
    # ~400 prompt tokens + 400 output tokens: 10 blocks = 600 of the replica's 1024 pages.
    client, resp, busy_replica = _start_long_stream(server, prompt_words=400, max_tokens=400)
    try:
        time.sleep(1.0)  # let a stats report show the long request's pages
        served_by = []
        for _ in range(4):
            r = httpx.post(
                f"{server}/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2}, timeout=60
            )
            assert r.status_code == 200
            served_by.append(r.headers[REPLICA_HEADER])
        assert busy_replica not in served_by, (busy_replica, served_by)
    finally:
        resp.close()
        client.close()


def test_burst_is_spread_despite_stats_lag(server):
    """A burst routed within one stats period must not all land on the replica that looked emptiest."""
    _wait_engines_idle()
    time.sleep(1.0)
    # Make one replica slightly fuller so that, without local accounting, every burst request would
    # rank the other first.
    client, resp, fuller = _start_long_stream(server, prompt_words=60, max_tokens=200)
    try:
        time.sleep(1.0)

        async def burst():
            body = {"model": MODEL, "prompt": "word " * 40, "max_tokens": 260, "ignore_eos": True, "stream": True}
            async with httpx.AsyncClient(timeout=60) as ac:

                async def one():
                    async with ac.stream("POST", f"{server}/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        return r.headers[REPLICA_HEADER]  # leaving the block disconnects: aborts it

                return await asyncio.gather(*(one() for _ in range(3)))

        replicas = asyncio.run(burst())
        assert fuller in replicas and len(set(replicas)) == 2, (fuller, replicas)
    finally:
        resp.close()
        client.close()


# ---- metrics ---------------------------------------------------------------------------------------


def _scrape(server: str) -> dict[str, list]:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _total(samples, suffix: str = "") -> float:
    return sum(s.value for s in samples if s.name.endswith(suffix))


def test_metrics_cover_replicas_and_move(server):
    expected = [
        "ray_vllm_num_requests_running",
        "ray_vllm_num_requests_waiting",
        "ray_vllm_kv_cache_usage_perc",
        "ray_vllm_time_to_first_token_seconds",
        "ray_vllm_inter_token_latency_seconds",
        "ray_vllm_e2e_request_latency_seconds",
        "ray_vllm_prompt_tokens",
        "ray_vllm_generation_tokens",
        "ray_vattn_num_free_pages",
        "ray_vattn_num_mapped_pages",
    ]
    deadline = time.time() + 30
    while True:
        fams = _scrape(server)
        replicas = {s.labels.get("replica") for s in fams.get("ray_vattn_num_free_pages", [])}
        if all(name in fams for name in expected) and len(replicas) == 2:
            break
        assert time.time() < deadline, sorted(fams)
        time.sleep(1)
    before = _total(fams["ray_vllm_generation_tokens"], "_total")
    ttft_before = _total(fams["ray_vllm_time_to_first_token_seconds"], "_count")
    r = httpx.post(
        f"{server}/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 7, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200
    deadline = time.time() + 30
    while True:
        fams = _scrape(server)
        after = _total(fams["ray_vllm_generation_tokens"], "_total")
        if after >= before + 7 and _total(fams["ray_vllm_time_to_first_token_seconds"], "_count") > ttft_before:
            break
        assert time.time() < deadline, (before, after)
        time.sleep(1)
