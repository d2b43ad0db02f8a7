"""The engine replica's routing report, outside Serve: a plain ``EngineDeployment`` over a tiny dummy model."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
from ray.serve.context import _RequestContext, _serve_request_context  # noqa: E402

from deployments import engine_deployment  # noqa: E402
from deployments.engine_deployment import EngineDeployment, _InflightRequest  # noqa: E402
from deployments.routing_hint import RoutingHint  # noqa: E402
from engine.core_client import ProcessCore  # noqa: E402
from engine.errors import EngineDeadError  # noqa: E402
from engine.prefix_summary import cached_prefix_tokens, prefix_probe  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

# 16 pages of 64 KiB, 512 tokens per page, 4 pages (2 layers x K,V) per block of 512 tokens.
ENGINE_CONFIG = {
    "model": "dummy:tiny-llama",
    "device": "cpu",
    "max_batch_size": 4,
    "max_seq_len": 256,
    "kv_cache_memory_bytes": 1 << 20,
}


@pytest.fixture(scope="module", params=[False, True], ids=["core-in-thread", "core-process"])
def _shared_deployment(request):
    replica = EngineDeployment({**ENGINE_CONFIG, "engine_process": request.param}, "tiny")
    yield replica
    replica._engine.shutdown()


@pytest.fixture
def deployment(_shared_deployment):
    """One replica per core mode (a core process starts in ~5 s) for the module's tests that leave it as they found it:
    nothing of theirs in the replica's accounting afterwards (checked here), its engine alive (``fresh_deployment`` for
    the test that kills it)."""
    yield _shared_deployment
    assert _shared_deployment._inflight == {}, "a test left requests in the shared replica's accounting"


@pytest.fixture(params=[False, True], ids=["core-in-thread", "core-process"])
def fresh_deployment(request):
    replica = EngineDeployment({**ENGINE_CONFIG, "engine_process": request.param}, "tiny")
    yield replica
    replica._engine.shutdown()


def _generate(replica: EngineDeployment, request_id: str, max_tokens: int = 4):
    return replica.generate(
        RoutingHint(5, max_tokens),
        [5, 6, 7, 8, 9],
        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        request_id,
    )


def test_report_lists_the_serve_ids_of_accepted_requests(deployment):
    async def run() -> dict:
        # Inside Serve, the replica's request context carries the id the router knows the call by.
        _serve_request_context.set(_RequestContext(_internal_request_id="serve-id-1"))
        stream = _generate(deployment, "engine-id-1", max_tokens=100)
        await stream.__anext__()  # accepted and running; keep it open
        try:
            return deployment.record_routing_stats()
        finally:
            await stream.aclose()

    first_seq = deployment.record_routing_stats()["report_seq"]
    report = asyncio.run(run())
    assert report["healthy"] is True
    assert report["accepted_request_ids"] == ("serve-id-1",)
    assert report["num_reserved_pages"] == 0  # 105 tokens fit the block its prompt already mapped
    assert report["report_seq"] == first_seq + 1
    assert deployment.record_routing_stats()["accepted_request_ids"] == ()


def test_report_reads_a_snapshot_while_the_event_loop_accepts_requests(deployment, monkeypatch):
    pages_for_tokens = engine_deployment.pages_for_tokens

    def while_a_request_arrives(*args):
        # The replica's event loop accepts a request while Serve's thread pool computes the report.
        deployment._inflight[f"late-{len(deployment._inflight)}"] = _InflightRequest("late", 10, 10)
        return pages_for_tokens(*args)

    deployment._inflight["early"] = _InflightRequest("early", 10, 10)
    monkeypatch.setattr(engine_deployment, "pages_for_tokens", while_a_request_arrives)
    report = deployment.record_routing_stats()
    assert report["accepted_request_ids"] == ("early",)
    assert report["num_reserved_pages"] == 4  # its whole footprint: one block of 4 pages
    deployment._inflight.clear()


def test_n_choices_stream_with_their_index_and_reserve_pages_each(deployment):
    async def run() -> list:
        params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4, ignore_eos=True)
        return [chunk async for chunk in deployment.generate(RoutingHint(5, 4, 3), [5, 6, 7, 8, 9], params, "n3")]

    items = asyncio.run(run())
    assert all(len({c.index for c in item}) == len(item) for item in items)  # one chunk per choice per item
    chunks = [c for item in items for c in item]
    assert sorted(c.index for c in chunks if c.finished) == [0, 1, 2]
    assert all(sum(c.num_new_tokens for c in chunks if c.index == i) == 4 for i in range(3))
    assert deployment._inflight == {}
    # Sequences not started claim their whole footprint (one block of 4 pages), started ones what they lack.
    waiting = _InflightRequest("n3", 5, 100, num_output_tokens=(None, 3, None))
    assert deployment._pages_still_claimed(waiting, tokens_per_page=512.0) == 2 * 4


def test_pages_of_preempted_requests_count_as_reserved(deployment, monkeypatch):
    """A request preempted after its first token gave its pages back to the pool, and the replica counts it as
    started (only what it lacks): the engine's ``num_preempted_pages`` keeps those pages from looking free."""
    stats = deployment._engine.stats()
    monkeypatch.setattr(deployment._engine, "stats", lambda: dataclasses.replace(stats, num_preempted_pages=7))
    deployment._inflight["started"] = _InflightRequest("started", 10, 10, num_output_tokens=(3,))
    try:
        report = deployment.record_routing_stats()
    finally:
        deployment._inflight.clear()
    assert report["num_reserved_pages"] == 7  # it lacks nothing by its token counts: 13 of 20 tokens, one block


def test_requests_sharing_a_prompt_prefix_reserve_its_pages_once(deployment):
    """A burst of chats on one system prompt: the first one not started yet reserves the prompt's pages, the others
    only what their own tokens add (they map the shared blocks from it); an unrelated prompt reserves all of its."""
    report = deployment.record_routing_stats()
    per_page, block = report["tokens_per_page"], report["pages_per_token_block"]
    prompt = int(4 * per_page)
    shared = ((int(per_page), 11), (int(2 * per_page), 12))  # the system prompt's first two blocks
    first = _InflightRequest("a", prompt, 10, prefix_probe=shared)
    second = _InflightRequest("b", prompt, 10, prefix_probe=shared + ((int(3 * per_page), 13),))
    other = _InflightRequest("c", prompt, 10, prefix_probe=((int(per_page), 21),))
    full = engine_deployment.pages_for_tokens(prompt + 10, per_page, block)
    two_blocks = engine_deployment.pages_for_tokens(int(2 * per_page), per_page, block)
    assert deployment._reserved_pages([first, second, other], per_page) == 3 * full - two_blocks
    assert deployment._reserved_pages([other, first], per_page) == 2 * full  # nothing shared


def test_dead_engine_reports_no_capacity(fresh_deployment, monkeypatch):
    deployment = fresh_deployment
    assert deployment.record_routing_stats()["num_free_pages"] == 16
    core = deployment._engine._core
    if isinstance(core, ProcessCore):
        core.process.kill()  # the engine core process dies (OOM killer, a crash in native code)
        core.process.wait()
    else:

        def failing_step():
            raise RuntimeError("boom")

        monkeypatch.setattr(core.engine, "step", failing_step)

    async def run() -> list:
        return [chunk async for item in _generate(deployment, "doomed") for chunk in item]

    chunks = asyncio.run(run())
    assert chunks[-1].status_code == 503 and chunks[-1].error["type"] == "engine_dead"
    report = deployment.record_routing_stats()
    # Its requests fail at once, so nothing stays reserved: without this it would look the emptiest.
    assert report["healthy"] is False
    assert report["num_free_pages"] == 0 and report["num_free_slots"] == 0
    with pytest.raises(EngineDeadError):
        deployment.check_health()


def test_a_stuck_engine_fails_the_health_check_and_reports_unhealthy():
    """A core that stops stepping (SIGSTOP here, a hung kernel on a GPU) is reported dead after ``step_timeout_s``:
    Serve replaces the replica, the router stops sending to it, and its open request ends with a retryable 503."""
    replica = EngineDeployment({**ENGINE_CONFIG, "engine_process": True, "step_timeout_s": 2}, "tiny")
    pid = replica._engine.core_pid
    try:

        async def run() -> tuple[dict, list]:
            stream = _generate(replica, "stuck", max_tokens=200)
            await stream.__anext__()
            os.kill(pid, signal.SIGSTOP)
            stopped_s = time.monotonic()
            replica.check_health()  # not yet step_timeout_s
            while (report := replica.record_routing_stats())["healthy"]:
                assert time.monotonic() - stopped_s < 10, "the stuck replica still reports healthy"
                await asyncio.sleep(0.05)
            return report, [chunk async for item in stream for chunk in item]

        report, chunks = asyncio.run(run())
        assert report["num_free_pages"] == 0 and report["num_free_slots"] == 0
        with pytest.raises(EngineDeadError, match="the engine core is stuck"):
            replica.check_health()
        assert chunks[-1].status_code == 503 and chunks[-1].error["type"] == "engine_dead"
        assert replica._engine._core.process.wait(5) is not None  # killed: its memory is free for a replacement
    finally:
        _resume_if_alive(pid)  # the watchdog kills the stuck core process; if it did not, the STOP below ends it
        replica._engine.shutdown()


def test_report_summarizes_the_cached_prefixes_that_the_ingress_probes_for():
    # Token-major: 128 tokens of both layers' K and V in a page, the block of prefix caching.
    replica = EngineDeployment({**ENGINE_CONFIG, "kv_cache_layout": "token_major", "max_seq_len": 1024}, "tiny")
    try:
        params = asyncio.run(replica.model_info())["prefix_caching"]
        assert params["block_tokens"] == 128
        prompt = list(range(5, 605))  # 4 full blocks before its last token

        async def run(prompt_ids: list[int], request_id: str) -> list:
            sampling = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
            return [
                c async for c in replica.generate(RoutingHint(len(prompt_ids), 2), prompt_ids, sampling, request_id)
            ]

        asyncio.run(run(prompt, "first"))
        keys = set(replica.record_routing_stats()["prefix_keys"])
        assert cached_prefix_tokens(prefix_probe(prompt, params["block_tokens"], params["seed"]), keys) == 4 * 128
        other = prompt[:128] + [7] * 400  # shares its first block only
        assert cached_prefix_tokens(prefix_probe(other, params["block_tokens"], params["seed"]), keys) == 128
    finally:
        replica._engine.shutdown()


def _resume_if_alive(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
