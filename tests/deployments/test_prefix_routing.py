"""Prefix affinity on a real local Ray cluster: 2 CPU engine replicas with the embedded SmolLM2, real HTTP. Chats
that share a long system prompt go to the replica whose cache holds it, and reuse it there (its hit counter moves,
the other replica's does not)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

os.environ["RAY_AUTH_MODE"] = "disabled"

import httpx  # noqa: E402
import pytest  # noqa: E402

from deployments.ingress import REPLICA_HEADER  # noqa: E402
from tests.deployments.serve_harness import MODEL, served_app  # noqa: E402

# Token-major pages: 64 tokens of every layer's K and V in 45 pages of 64 KiB, the block of prefix caching.
# 192 MiB = 3072 pages = 68 blocks per replica: a ~900-token system prompt (15 blocks) and the four chats of a burst
# on it (each reserving its question and 4 output tokens) leave a fifth of the pool free, so the replica computing
# the prompt stays "roomy" for all four (at 128 MiB the fourth made it a tight fit, and it went elsewhere).
APP_ARGS = {
    "model": MODEL,
    "device": "cpu",
    "engine_kwargs": {
        "max_batch_size": 4,
        "max_seq_len": 2048,
        "kv_cache_memory_bytes": 192 << 20,
        "max_num_batched_tokens": 512,
        "kv_cache_layout": "token_major",
    },
    "engine": {"num_replicas": 2, "num_cpus": 0, "max_ongoing_requests": 4, "routing_stats_period_s": 0.2},
    "ingress": {"num_cpus": 0},
}
SYSTEM = (
    "You are the help desk of a city library. It opens at nine and closes at six, except on Sundays. Members "
    "borrow up to twelve books for three weeks and renew twice unless another member reserved the book. "
) * 22
QUESTIONS = ["When does it open?", "How many books?", "Can I renew?", "Sundays?", "Fines?", "Group rooms?"]


@pytest.fixture(scope="module")
def app():
    with served_app(APP_ARGS) as served:
        yield served


def _chat(app, question: str, system: str = SYSTEM) -> str:
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 4,
        "temperature": 0,
    }
    resp = httpx.post(f"{app.base_url}/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] > 900
    return resp.headers[REPLICA_HEADER]


def test_chats_sharing_a_system_prompt_go_where_it_is_cached(app):
    holder = _chat(app, "Hello!")
    time.sleep(1.0)  # its blocks reach the replica's routing report
    before = app.wait_engines_idle()
    assert set(before) == {holder, *before} and len(before) == 2
    # One at a time: both queues are empty whenever a question is routed, so only the cached prefix tells them apart.
    served_by = [_chat(app, question) for question in QUESTIONS]
    assert served_by == [holder] * len(QUESTIONS)
    after = app.wait_engines_idle()
    other = next(replica for replica in after if replica != holder)
    hits = after[holder]["prefix_cache_hits"] - before[holder]["prefix_cache_hits"]
    queries = after[holder]["prefix_cache_queries"] - before[holder]["prefix_cache_queries"]
    assert hits >= len(QUESTIONS) * 13 * 64 and hits / queries > 0.9, (hits, queries)
    assert after[other]["prefix_cache_queries"] == before[other]["prefix_cache_queries"]


def test_a_burst_on_two_system_prompts_keeps_each_prompt_on_one_replica(app):
    """Four chats on each of two new system prompts, all sent at once (the replicas take 4 each): each prompt's chats
    go to one replica, so each replica computes one system prompt. Three bursts, each on prompts not seen before,
    each while the last one's report may still count the previous burst."""
    museum = SYSTEM.replace("library", "museum").replace("books", "paintings")
    for burst in range(3):
        systems = {"library": f"Session {burst}. " + SYSTEM, "museum": f"Session {burst}. " + museum}
        chats = [(label, system, f"Question {i}?") for i in range(4) for label, system in systems.items()]
        app.wait_engines_idle()
        with ThreadPoolExecutor(len(chats)) as pool:
            replicas = list(pool.map(lambda chat: _chat(app, chat[2], system=chat[1]), chats))
        by_prompt = {label: {r for (lab, _, _), r in zip(chats, replicas) if lab == label} for label in systems}
        assert all(len(held) == 1 for held in by_prompt.values()), (burst, by_prompt)
        assert by_prompt["library"] != by_prompt["museum"], (burst, by_prompt)
