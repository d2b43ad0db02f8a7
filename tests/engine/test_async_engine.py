"""AsyncLLMEngine: streaming, concurrency, cancellation, errors, on the embedded model; the step watchdog on a tiny
dummy one."""

import asyncio
import threading
import time

import pytest

from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.errors import EngineDeadError, InvalidRequestError, PromptTooLongError
from engine.sampling_params import SamplingParams

NUM_SLOTS = 4
# The watchdog's engines: a tiny dummy model, quick to build and to step.
TINY = {
    "model": "dummy:tiny-llama",
    "device": "cpu",
    "max_batch_size": 2,
    "max_seq_len": 256,
    "kv_cache_memory_bytes": 1 << 20,
}


@pytest.fixture(scope="module", params=[False, True], ids=["core-in-thread", "core-process"])
def engine(request):
    config = {"max_batch_size": NUM_SLOTS, "max_seq_len": 512, "max_num_batched_tokens": 128}
    eng = AsyncLLMEngine(EngineConfig.from_dict({**config, "engine_process": request.param}))
    yield eng
    eng.shutdown()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def wait_idle(engine, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_slots == NUM_SLOTS:
            return stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def test_streaming_yields_deltas_that_add_up(engine):
    async def main():
        outs = [
            o async for o in engine.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12))
        ]
        return outs

    outs = run(main())
    assert len(outs) == 12  # one output per token
    assert sum(o.finished for o in outs) == 1 and outs[-1].finished
    assert "".join(o.new_text for o in outs) == outs[-1].text
    assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids
    assert outs[-1].finish_reason == "length"
    assert outs[-1].first_token_time >= outs[-1].arrival_time


def test_n_samples_stream_interleaved_until_the_last_one_finishes(engine):
    async def main():
        params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
        return [o async for o in engine.generate("Once upon a time", params)]

    outs = run(main())
    assert len(outs) == 3 * 6 and outs[-1].finished
    by_index = {i: [o for o in outs if o.index == i] for i in range(3)}
    for chunks in by_index.values():
        assert len(chunks) == 6 and [o.finished for o in chunks] == [False] * 5 + [True]
        assert "".join(o.new_text for o in chunks) == chunks[-1].text
    assert len({tuple(c[-1].token_ids) for c in by_index.values()}) == 3
    run(wait_idle(engine))


def test_concurrent_requests_and_the_event_loop_stays_responsive(engine):
    prompts = [f"Count from {i} to {i + 20}:" for i in range(6)]  # 6 requests > 4 slots: some queue

    async def collect(i, prompt):
        text = ""
        async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=16), request_id=f"cc{i}"):
            text += out.new_text
        return text, out

    async def ticker(stop):
        gaps, last = [], time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
        return max(gaps)

    async def main():
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        results = await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompts)))
        stop.set()
        return results, await tick

    results, max_gap_s = run(main())
    for text, final in results:
        assert text == final.text and final.num_output_tokens == 16
    # Steps run on the engine thread: the loop is never stuck behind a forward.
    assert max_gap_s < 0.5


def test_cancelling_the_consumer_aborts_and_frees_the_slot(engine):
    async def main():
        got = []

        async def consume():
            async for out in engine.generate(
                "Tell me a very long story.", SamplingParams(max_tokens=400, ignore_eos=True)
            ):
                got.append(out)

        task = asyncio.create_task(consume())
        while len(got) < 3:
            await asyncio.sleep(0.01)
        assert engine.stats().num_running == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine)
        return got

    got = run(main())
    assert not got[-1].finished


@pytest.mark.parametrize("n", [1, 3])
def test_breaking_out_of_the_stream_aborts_the_request(engine, n):
    async def main():
        stream = engine.generate("Once upon a time", SamplingParams(n=n, max_tokens=400, ignore_eos=True))
        async for out in stream:
            if out.num_output_tokens >= 2:
                break
        await stream.aclose()
        return await wait_idle(engine)

    run(main())


def test_explicit_abort_delivers_a_final_abort_output(engine):
    async def main():
        outs = []
        async for out in engine.generate("Once upon a time", SamplingParams(max_tokens=400, ignore_eos=True), "ab1"):
            outs.append(out)
            if len(outs) == 2:
                await engine.abort("ab1")
        return outs

    outs = run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert outs[-1].num_output_tokens < 400


def test_bad_requests_fail_only_themselves(engine):
    async def main():
        with pytest.raises(InvalidRequestError) as info:
            async for _ in engine.generate("hi", _bad_params()):
                pass
        assert info.value.param == "temperature"
        with pytest.raises(PromptTooLongError):
            async for _ in engine.generate([5] * 600, SamplingParams(max_tokens=4)):
                pass
        with pytest.raises(InvalidRequestError):
            async for _ in engine.generate("", SamplingParams(max_tokens=4)):
                pass
        # The engine keeps serving.
        outs = [o async for o in engine.generate("Hello", SamplingParams(max_tokens=3, temperature=0))]
        return outs

    outs = run(main())
    assert outs[-1].finished and outs[-1].num_output_tokens == 3
    assert not engine.is_dead


def _bad_params() -> SamplingParams:
    params = SamplingParams()
    params.temperature = 5.0
    return params


def test_duplicate_running_request_id_is_rejected(engine):
    async def main():
        first = engine.generate("Once upon a time", SamplingParams(max_tokens=50, ignore_eos=True), "dup")
        await first.__anext__()
        with pytest.raises(InvalidRequestError) as info:
            async for _ in engine.generate("Hi", SamplingParams(max_tokens=2), "dup"):
                pass
        assert info.value.param == "request_id"
        await first.aclose()
        await wait_idle(engine)

    run(main())


def _schema_of(num_fields: int) -> dict:
    """A JSON schema whose grammar takes the engine's xgrammar compiler ~2 ms per field on a 2-core machine."""
    field = {
        "type": "object",
        "properties": {
            "a": {"type": "array", "items": {"type": "string", "pattern": "[a-z]{3,9}"}},
            "b": {"enum": [str(j) for j in range(50)]},
            "c": {"type": "number"},
        },
        "required": ["a", "b"],
    }
    names = [f"f{i}" for i in range(num_fields)]
    return {"type": "object", "properties": dict.fromkeys(names, field), "required": names}


def test_a_schema_compiles_while_the_other_requests_run(engine):
    """A schema that takes seconds to compile holds up its own request only: a plain request sent after it streams
    and finishes first. What can be refused without the grammar is refused at once; a schema that does not compile
    fails its request; a request aborted while it compiles ends with a final "abort" output at once, and its id is
    free again."""
    slow = _schema_of(1200)  # ~2.5 s to compile here, against ~0.7 s for the plain request with the compile beside it

    async def main():
        finished = []

        async def send(name, params, request_id=None, prompt="Hello"):
            outs = [o async for o in engine.generate(prompt, params, request_id)]
            finished.append(name)
            return outs

        await send("warm-up", SamplingParams(max_tokens=1))  # a first step pays one-off costs: not in the race
        finished.clear()
        constrained = asyncio.create_task(send("constrained", SamplingParams(max_tokens=1, json_schema=slow)))
        await asyncio.sleep(0.05)  # the schema's request reaches the core first
        for _ in range(100):  # while it compiles, the core's stats count it as waiting (the router's load)
            if engine.stats().num_waiting == 1:
                break
            await asyncio.sleep(0.01)
        waiting_while_compiling = engine.stats().num_waiting
        plain = await send("plain", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        waiting_after_plain = engine.stats().num_waiting  # its last step's stats, the schema still compiling
        with pytest.raises(PromptTooLongError):  # refused before its (invalid) schema is looked at
            await send("too long", SamplingParams(max_tokens=4, json_schema={"type": "objekt"}), prompt=[5] * 600)
        assert (await constrained)[-1].finished
        with pytest.raises(InvalidRequestError) as info:
            await send("invalid", SamplingParams(max_tokens=4, json_schema={"type": "objekt"}))
        aborted = asyncio.create_task(
            send("aborted", SamplingParams(max_tokens=4, json_schema=_schema_of(1201)), "ab2")
        )
        await asyncio.sleep(0.05)
        await engine.abort("ab2")
        aborted = await aborted
        again = await send("again", SamplingParams(max_tokens=2, temperature=0), "ab2")
        return finished, plain, info.value, aborted, again, (waiting_while_compiling, waiting_after_plain)

    finished, plain, invalid, aborted, again, waiting = run(main())
    assert finished == ["plain", "constrained", "aborted", "again"]
    assert waiting == (1, 1)
    assert plain[-1].num_output_tokens == 4
    assert invalid.param == "json_schema"
    assert aborted[-1].finished and aborted[-1].finish_reason == "abort" and aborted[-1].num_output_tokens == 0
    assert again[-1].num_output_tokens == 2
    run(wait_idle(engine))


# ---- the step watchdog (step_timeout_s) ----------------------------------------------------------------------


async def wait_for_failure(engine, timeout_s=10.0) -> Exception:
    """``engine.failure()`` once it says something, polled as Serve's health checks and routing reports do."""
    deadline = time.monotonic() + timeout_s
    while (failure := engine.failure()) is None:
        assert time.monotonic() < deadline, "the stuck engine still looks healthy"
        await asyncio.sleep(0.05)
    return failure


class _BlockedSteps:
    """Makes an in-thread core's ``LLMEngine.step`` block until ``release()``, as a step stuck in a hung kernel or
    collective would, forever."""

    def __init__(self, engine: AsyncLLMEngine, monkeypatch) -> None:
        self._llm = engine._core.engine
        self._real_step = self._llm.step
        self._monkeypatch = monkeypatch
        self._released = threading.Event()

    def block(self) -> None:
        self._monkeypatch.setattr(self._llm, "step", self._blocked_step)

    def release(self) -> None:
        self._released.set()

    def _blocked_step(self):
        self._released.wait()
        return self._real_step()


def test_a_core_stuck_in_a_step_fails_the_engine_after_step_timeout_s(monkeypatch):
    """A step that never returns raises nothing: without the watchdog the engine would look healthy while its
    requests hang until the clients give up."""
    engine = AsyncLLMEngine(EngineConfig.from_dict({**TINY, "engine_process": False, "step_timeout_s": 2}))
    steps = _BlockedSteps(engine, monkeypatch)
    try:

        async def main():
            outs = []

            async def consume():
                async for out in engine.generate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True)):
                    outs.append(out)

            task = asyncio.create_task(consume())
            while not outs:
                await asyncio.sleep(0.01)
            steps.block()
            blocked_s = time.monotonic()
            assert engine.failure() is None  # not yet step_timeout_s
            failure = await wait_for_failure(engine)
            waited_s = time.monotonic() - blocked_s
            with pytest.raises(EngineDeadError, match="the engine core is stuck"):
                await task
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate([5, 6], SamplingParams(max_tokens=2)):
                    pass
            return failure, waited_s

        failure, waited_s = run(main())
        assert isinstance(failure, EngineDeadError)
        assert "no engine step finished" in str(failure) and "(step_timeout_s 2) with 1 request in it" in str(failure)
        assert 1.5 < waited_s < 5
        assert engine.is_dead and engine.failure() is failure
    finally:
        steps.release()
        engine.shutdown()


def test_an_idle_engine_is_not_stuck_and_its_next_request_starts_a_fresh_clock(monkeypatch):
    engine = AsyncLLMEngine(EngineConfig.from_dict({**TINY, "engine_process": False, "step_timeout_s": 0.5}))
    steps = _BlockedSteps(engine, monkeypatch)
    try:
        time.sleep(1.0)  # no step for twice step_timeout_s, but nothing was asked of the core
        assert engine.failure() is None

        async def main():
            steps.block()  # the core hears of the request but says nothing until released
            task = asyncio.create_task(_collect(engine.generate([5, 6, 7], SamplingParams(max_tokens=3))))
            await asyncio.sleep(0.1)
            healthy_while_open = engine.failure() is None  # 0.1 s since the request came, not 1.1 s
            steps.release()
            return healthy_while_open, await task

        healthy_while_open, outs = run(main())
        assert healthy_while_open
        assert outs[-1].finished and engine.failure() is None
    finally:
        steps.release()
        engine.shutdown()


def test_clients_giving_up_one_after_another_do_not_hide_a_stuck_core(monkeypatch):
    """Each client of a stuck core gives up before step_timeout_s, so a stream is never open for long; their requests
    stay in the core (their aborts unread), so the next request must not start the clock afresh."""
    engine = AsyncLLMEngine(EngineConfig.from_dict({**TINY, "engine_process": False, "step_timeout_s": 1}))
    steps = _BlockedSteps(engine, monkeypatch)
    steps.block()
    try:

        async def main():
            started = time.monotonic()
            while engine.failure() is None:
                assert time.monotonic() - started < 5, "clients that give up kept a stuck core looking healthy"
                task = asyncio.create_task(_collect(engine.generate([5, 6, 7], SamplingParams(max_tokens=3))))
                await asyncio.sleep(0.4)  # then the client gives up
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            return time.monotonic() - started

        assert 1.0 < run(main()) < 2.5
    finally:
        steps.release()
        engine.shutdown()


@pytest.mark.parametrize("engine_process", [False, True], ids=["core-in-thread", "core-process"])
def test_a_streaming_engine_is_not_stuck(engine_process):
    engine = AsyncLLMEngine(EngineConfig.from_dict({**TINY, "engine_process": engine_process, "step_timeout_s": 1}))
    try:

        async def main():
            params = SamplingParams(max_tokens=100, ignore_eos=True)
            return [(out, engine.failure()) async for out in engine.generate([5, 6, 7], params)]

        outs = run(main())
        assert outs[-1][0].finished and outs[-1][0].num_output_tokens == 100
        assert [failure for _, failure in outs] == [None] * 100
    finally:
        engine.shutdown()


def test_a_grammar_compiling_past_step_timeout_s_is_not_a_stuck_core(monkeypatch):
    """While only a grammar compiles no step runs: the core's heartbeat keeps the watchdog off it."""
    engine = AsyncLLMEngine(EngineConfig.from_dict({**TINY, "engine_process": False, "step_timeout_s": 2}))
    llm = engine._core.engine
    real_compile = llm.compile_grammars

    def slow_compile(params):
        time.sleep(4)  # twice step_timeout_s
        return real_compile(params)

    monkeypatch.setattr(llm, "compile_grammars", slow_compile)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    try:

        async def main():
            failures = []
            sent_s = time.monotonic()
            task = asyncio.create_task(
                _collect(engine.generate("Hi", SamplingParams(max_tokens=4, json_schema=schema)))
            )
            while not task.done():
                failures.append(engine.failure())
                await asyncio.sleep(0.05)
            return await task, failures, time.monotonic() - sent_s

        outs, failures, took_s = run(main())
        assert outs[-1].finished and took_s > 4
        assert set(failures) == {None}
    finally:
        engine.shutdown()


def test_a_schema_past_the_compile_deadline_fails_its_request_alone(monkeypatch):
    """A schema that compiles for longer than GRAMMAR_COMPILE_TIMEOUT_S is refused (HTTP 400 over the API) while its
    compile runs on; a schema sent after it compiles beside it and its request completes."""
    from engine import engine_core

    monkeypatch.setattr(engine_core, "GRAMMAR_COMPILE_TIMEOUT_S", 2.0)
    engine = AsyncLLMEngine(EngineConfig.from_dict({**TINY, "engine_process": False}))
    llm = engine._core.engine
    real_compile = llm.compile_grammars
    release = threading.Event()

    def compile_slowly_when_asked(params):
        if "slow" in params.json_schema.get("properties", {}):
            release.wait(20)
        return real_compile(params)

    monkeypatch.setattr(llm, "compile_grammars", compile_slowly_when_asked)
    slow = {"type": "object", "properties": {"slow": {"type": "integer"}}, "required": ["slow"]}
    quick = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    try:

        async def main():
            await _collect(engine.generate("Hi", SamplingParams(max_tokens=1, json_schema=quick)))  # the compiler
            started = time.monotonic()
            slow_task = asyncio.create_task(_collect(engine.generate("Hi", SamplingParams(json_schema=slow))))
            await asyncio.sleep(0.05)
            quick_outs = await _collect(engine.generate("Hi", SamplingParams(max_tokens=4, json_schema=quick)))
            quick_s = time.monotonic() - started
            with pytest.raises(InvalidRequestError, match="did not compile within 2 s") as info:
                await slow_task
            return quick_outs, quick_s, info.value, time.monotonic() - started

        quick_outs, quick_s, error, refused_s = run(main())
        assert quick_outs[-1].finished and quick_s < 2.0  # not behind the slow compile
        assert error.param == "json_schema" and 2.0 <= refused_s < 6
        assert engine.failure() is None
    finally:
        release.set()
        engine.shutdown()


async def _collect(agen) -> list:
    return [out async for out in agen]


def test_shutdown_fails_pending_and_new_requests_with_engine_dead(engine):
    # Runs last in this module: it kills the module's engine.
    async def main():
        outs = []

        async def consume():
            async for out in engine.generate("Once upon a time", SamplingParams(max_tokens=400, ignore_eos=True)):
                outs.append(out)

        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError):
            await task
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("Hi", SamplingParams(max_tokens=2)):
                pass

    run(main())
    assert engine.is_dead
