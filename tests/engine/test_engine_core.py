"""The engine core in its own process: a real child process, real ZeroMQ sockets, a real engine.

The embedded model for what a client sees through the process (tokens, logprobs, errors; streaming, aborts and
cancellation run through both cores in test_async_engine.py); a tiny dummy model for the core's death, which these
tests cause.
"""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.core_client import ProcessCore
from engine.core_protocol import decode_event, encode_step
from engine.errors import EngineDeadError, InvalidRequestError, PromptTooLongError
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput
from engine.prefix_summary import PrefixSummary
from engine.sampling_params import SamplingParams

CONFIG = {"max_batch_size": 4, "max_seq_len": 512, "max_num_batched_tokens": 128, "device": "cpu"}
TINY = {
    "model": "dummy:tiny-llama",
    "device": "cpu",
    "max_batch_size": 2,
    "max_seq_len": 256,
    "kv_cache_memory_bytes": 1 << 20,
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine(EngineConfig.from_dict({**CONFIG, "engine_process": True}))
    assert isinstance(eng._core, ProcessCore)
    yield eng
    eng.shutdown()
    assert eng._core.process.poll() == 0  # told to stop, it stopped cleanly


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def test_the_process_streams_the_engines_greedy_tokens_with_logprobs(engine):
    prompts = ["The capital of France is", "Count from 1 to 10:"]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
    reference = LLMEngine(EngineConfig.from_dict(CONFIG))
    try:
        expected = reference.generate(prompts, params)
    finally:
        reference.shutdown()

    async def collect(prompt):
        return [o async for o in engine.generate(prompt, params)]

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts))

    for outs, want in zip(run(main()), expected):
        assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids == want.token_ids
        assert "".join(o.new_text for o in outs) == outs[-1].text == want.text
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert outs[-1].prompt_token_ids == want.prompt_token_ids  # kept by the frontend, not sent back
        logprobs = [lp for o in outs for lp in o.new_logprobs]
        assert [lp["token_id"] for lp in logprobs] == want.token_ids
        assert all(len(lp["top"]) == 2 for lp in logprobs)


def test_the_cores_refusals_reach_their_request_with_the_param(engine):
    async def main():
        with pytest.raises(PromptTooLongError) as too_long:
            async for _ in engine.generate([5] * 600, SamplingParams(max_tokens=4)):
                pass
        with pytest.raises(InvalidRequestError) as bad_ids:
            async for _ in engine.generate([5, 10**9], SamplingParams(max_tokens=4)):
                pass
        return too_long.value, bad_ids.value

    too_long, bad_ids = run(main())
    assert too_long.param == "prompt" and "maximum context length" in too_long.message
    assert bad_ids.param == "prompt"
    assert not engine.is_dead and engine.failure() is None


def test_integers_past_64_bits_reach_the_core(engine):
    params = SamplingParams(temperature=0.5, top_k=10**30, stop_token_ids=[10**40], max_tokens=3, ignore_eos=True)

    async def main():
        return [o async for o in engine.generate("Hello", params)]

    outs = run(main())
    assert outs[-1].finished and outs[-1].num_output_tokens == 3


def test_step_messages_round_trip():
    out = RequestOutput(
        request_id="r",
        prompt_token_ids=[1, 2],
        new_token_ids=[7],
        new_text="x",
        text="",
        token_ids=[],
        finished=True,
        finish_reason="abort",
        stop_reason="\n",
        num_prompt_tokens=2,
        num_output_tokens=1,
        arrival_time=1.5,
        first_token_time=None,
        new_logprobs=[{"token_id": 7, "logprob": -0.5, "top": [[7, -0.5]]}],
        error=PromptTooLongError("too long", "max_tokens"),
        index=1,
        num_cached_tokens=64,
    )
    summary = PrefixSummary(block_tokens=16, seed=2**64 - 1, keys=(2**63 + 5, 7))
    stats = EngineStats(10, 5, 5, 1, 85.3, 65536, 60, 1, 0, 0.5, 0, 3, 4, 900, 512, 2, prefix_summary=summary)
    kind, (got,), got_stats = decode_event(encode_step([out], stats))
    assert got_stats == stats and got.prompt_token_ids is None  # the frontend fills it in
    assert isinstance(got.error, PromptTooLongError) and got.error.param == "max_tokens"
    got.prompt_token_ids, got.error, out.error = out.prompt_token_ids, None, None
    assert got == out


def test_a_dead_core_process_fails_its_requests_and_the_health_check():
    engine = AsyncLLMEngine(EngineConfig.from_dict({**TINY, "engine_process": True}))
    try:

        async def main():
            outs = []

            async def consume():
                params = SamplingParams(max_tokens=200, ignore_eos=True)
                async for out in engine.generate([5, 6, 7], params):
                    outs.append(out)

            task = asyncio.create_task(consume())
            while not outs:
                await asyncio.sleep(0.01)
            os.kill(engine._core.process.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError, match="exited with code -9"):
                await task
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate([5, 6], SamplingParams(max_tokens=2)):
                    pass

        run(main())
        assert engine.is_dead and isinstance(engine.failure(), EngineDeadError)
    finally:
        engine.shutdown()


def test_a_stopped_core_process_fails_its_requests_and_the_health_check_after_step_timeout_s():
    """A core process that stops stepping without exiting (SIGSTOP here; on a GPU a hung kernel or collective) raises
    nothing and closes no socket: the watchdog is what fails its requests and the health check."""
    engine = AsyncLLMEngine(EngineConfig.from_dict({**TINY, "engine_process": True, "step_timeout_s": 2}))
    pid = engine.core_pid
    try:

        async def main():
            outs = []

            async def consume():
                async for out in engine.generate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True)):
                    outs.append(out)

            task = asyncio.create_task(consume())
            while not outs:
                await asyncio.sleep(0.01)
            os.kill(pid, signal.SIGSTOP)
            stopped_s = time.monotonic()
            assert engine.failure() is None  # not yet step_timeout_s
            while (failure := engine.failure()) is None:
                assert time.monotonic() - stopped_s < 10, "the stopped core still looks healthy"
                await asyncio.sleep(0.05)
            waited_s = time.monotonic() - stopped_s
            with pytest.raises(EngineDeadError, match="the engine core is stuck"):
                await task
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate([5, 6], SamplingParams(max_tokens=2)):
                    pass
            return failure, waited_s

        failure, waited_s = run(main())
        assert isinstance(failure, EngineDeadError) and "no engine step finished" in str(failure)
        assert 1.5 < waited_s < 5
        assert engine.is_dead
        assert engine._core.process.wait(5) is not None  # killed: its memory is free for a replacement
    finally:
        _resume_if_alive(pid)  # the watchdog kills the stuck core process; if it did not, the STOP below ends it
        engine.shutdown()


def test_commands_sent_while_the_core_is_stalled_are_all_delivered():
    """A core busy in a long step reads no commands: thousands can pile up (a burst of client disconnects' aborts).
    None may be dropped: a lost ADD is a request that never answers, a lost ABORT one that runs on unread."""
    engine = AsyncLLMEngine(EngineConfig.from_dict({**TINY, "engine_process": True}))
    pid = engine._core.process.pid
    try:
        os.kill(pid, signal.SIGSTOP)  # stalled, as in a long step
        try:
            for i in range(5000):
                engine._core.abort(f"gone-{i}")  # unknown ids: no-ops once read

            async def main():
                task = asyncio.create_task(_collect(engine.generate([5, 6, 7], SamplingParams(max_tokens=3))))
                await asyncio.sleep(0.5)
                os.kill(pid, signal.SIGCONT)
                return await task

            outs = run(main())
        finally:
            os.kill(pid, signal.SIGCONT)
        assert outs[-1].finished and len(outs[-1].token_ids) == 3
    finally:
        engine.shutdown()


async def _collect(agen) -> list:
    return [out async for out in agen]


def test_the_core_process_exits_when_its_frontend_dies():
    script = textwrap.dedent(f"""
        import time
        from engine.async_engine import AsyncLLMEngine
        from engine.config import EngineConfig
        engine = AsyncLLMEngine(EngineConfig.from_dict({{**{TINY!r}, "engine_process": True}}))
        print(engine._core.process.pid, flush=True)
        time.sleep(600)
    """)
    frontend = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO_ROOT}
    )
    try:
        core_pid = int(frontend.stdout.readline())
    finally:
        frontend.kill()
        frontend.wait()
    deadline = time.monotonic() + 20
    while _is_running(core_pid):
        assert time.monotonic() < deadline, "the orphaned core process kept running"
        time.sleep(0.2)


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited (nobody reaped it yet)
    except FileNotFoundError:
        return False


def _resume_if_alive(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
