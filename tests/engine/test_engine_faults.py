"""A failure while processing one request fails that request only; the engine keeps stepping.

The fault is real detokenization failing inside the engine: the engine's tokenizer is wrapped so that
decoding a "poisoned" token id raises. The detokenizer decodes each request's last prompt tokens with
its output, so a request whose prompt ends with the poisoned id fails on its first output token, while
requests that never see that id are untouched. A second fault is a batched sampling call that raises
for one request's row: the engine samples the rows alone and fails only that request. The engine itself
is the real one (embedded SmolLM2).
"""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams

NUM_SLOTS = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


class PoisonedDecodeError(RuntimeError):
    pass


@pytest.fixture(scope="module")
def engine():
    eng = LLMEngine(
        EngineConfig.from_dict({"max_batch_size": NUM_SLOTS, "max_seq_len": 256, "max_num_batched_tokens": 128})
    )
    yield eng
    eng.shutdown()


class PoisonedTokenizer:
    """The engine's real tokenizer, except that decoding ``poisoned_id`` raises.

    It has no ``backend_tokenizer``, so the detokenizer uses its plain ``decode`` path (the one for
    tokenizers without a ``tokenizers`` backend), which is where the fault is injected.
    """

    backend_tokenizer = None

    def __init__(self, real, poisoned_id: int) -> None:
        self._real = real
        self._poisoned_id = poisoned_id

    def decode(self, token_ids, *args, **kwargs):
        if self._poisoned_id in list(token_ids):
            raise PoisonedDecodeError(f"cannot decode token {self._poisoned_id}")
        return self._real.decode(token_ids, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture(scope="module")
def poison(engine):
    """A token id the greedy continuations below never produce; decoding it raises."""
    real = engine.tokenizer
    poisoned_id = real.convert_tokens_to_ids(real.tokenize(" zygote"))[-1]
    engine.tokenizer = PoisonedTokenizer(real, poisoned_id)  # used for every request added from now on
    yield poisoned_id
    engine.tokenizer = real


def _run(engine, requests: dict) -> dict:
    """Adds ``requests`` (id -> (prompt token ids, params)) and steps until none is unfinished, within 100 steps; a
    step must never raise for one request's failure. Returns each request's final output by id."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    finals = {}
    for _ in range(100):
        if not engine.has_unfinished():
            return finals
        finals.update({out.request_id: out for out in engine.step() if out.finished})
    raise AssertionError(f"still unfinished after 100 steps; finished: {sorted(finals)}")


def _healthy_prompt(engine) -> list[int]:
    return engine.tokenizer.encode("The capital of France is")


def test_failing_request_is_finished_alone_and_others_are_unaffected(engine, poison):
    healthy = _healthy_prompt(engine)
    (alone,) = engine.generate([healthy], GREEDY)
    assert poison not in alone.token_ids

    finals = _run(
        engine, {"good-1": (healthy, GREEDY), "bad": (healthy + [poison], GREEDY), "good-2": (healthy, GREEDY)}
    )
    assert set(finals) == {"good-1", "bad", "good-2"}
    bad = finals["bad"]
    assert bad.finish_reason == "abort" and isinstance(bad.error, PoisonedDecodeError)
    for rid in ("good-1", "good-2"):
        assert finals[rid].error is None and finals[rid].finish_reason == "length"
        assert finals[rid].token_ids == alone.token_ids and finals[rid].text == alone.text
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.num_free_slots == NUM_SLOTS
    assert stats.num_free_pages + stats.num_reclaimable_pages == stats.num_total_pages
    # Still serving afterwards.
    (again,) = engine.generate([healthy], GREEDY)
    assert again.token_ids == alone.token_ids


class SamplerFailingOnSeed(Sampler):
    """The engine's real sampler, except that a batch holding a request with ``seed == BAD_SEED`` raises,
    as a batched sampling kernel does when one row is invalid."""

    BAD_SEED = 666

    def sample(self, logits, params, output_token_ids, generators, grammars=None):
        if any(p.seed == self.BAD_SEED for p in params):
            raise RuntimeError("invalid row in the sampling batch")
        return super().sample(logits, params, output_token_ids, generators, grammars)


def test_a_sampling_failure_fails_only_its_request(engine):
    healthy = _healthy_prompt(engine)
    (alone,) = engine.generate([healthy], GREEDY)
    real = engine.sampler
    engine.sampler = SamplerFailingOnSeed(engine.device)
    try:
        bad_params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, seed=SamplerFailingOnSeed.BAD_SEED)
        finals = _run(
            engine, {"s-good-1": (healthy, GREEDY), "s-bad": (healthy, bad_params), "s-good-2": (healthy, GREEDY)}
        )
        assert set(finals) == {"s-good-1", "s-bad", "s-good-2"}
        assert finals["s-bad"].finish_reason == "abort" and "invalid row" in str(finals["s-bad"].error)
        for rid in ("s-good-1", "s-good-2"):
            assert finals[rid].error is None and finals[rid].token_ids == alone.token_ids
        stats = engine.stats()
        assert stats.num_running == stats.num_waiting == 0 and stats.num_free_slots == NUM_SLOTS
    finally:
        engine.sampler = real


def test_a_sampling_failure_in_a_step_that_completes_a_cached_block_fails_only_its_request():
    """With prefix caching, a step registers the blocks it completes: a request whose sampling failed in that step
    (finished, its slot released) must not be registered as if it still held its slot. The failing request's
    prompt fills a block, so the step that prefills it and fails its sampling completes one."""
    eng = LLMEngine(
        EngineConfig.from_dict({"max_batch_size": NUM_SLOTS, "max_seq_len": 256, "kv_cache_layout": "token_major"})
    )
    try:
        healthy = _healthy_prompt(eng)
        long_prompt = (healthy * 64)[: eng.scheduler.block_tokens + 6]
        eng.sampler = SamplerFailingOnSeed(eng.device)
        bad_params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, seed=SamplerFailingOnSeed.BAD_SEED)
        finals = _run(eng, {"good": (healthy, GREEDY), "bad": (long_prompt, bad_params)})
        assert set(finals) == {"good", "bad"}
        assert finals["bad"].finish_reason == "abort" and "invalid row" in str(finals["bad"].error)
        assert finals["good"].error is None and len(finals["good"].token_ids) > 0
        stats = eng.stats()
        assert stats.num_running == stats.num_waiting == 0 and stats.num_free_slots == NUM_SLOTS
        assert stats.num_free_pages + stats.num_reclaimable_pages == stats.num_total_pages
    finally:
        eng.shutdown()


def test_async_engine_raises_to_the_failing_consumer_only_and_keeps_stepping(engine, poison):
    healthy = _healthy_prompt(engine)
    (alone,) = engine.generate([healthy], GREEDY)
    async_engine = AsyncLLMEngine(engine=engine)

    async def consume(prompt, request_id):
        text = ""
        async for out in async_engine.generate(prompt, GREEDY, request_id):
            text += out.new_text
        return text

    async def run():
        return await asyncio.wait_for(
            asyncio.gather(
                consume(healthy, "a-good-1"),
                consume(healthy + [poison], "a-bad"),
                consume(healthy, "a-good-2"),
                return_exceptions=True,
            ),
            timeout=120,
        )

    try:
        good_1, bad, good_2 = asyncio.run(run())
        assert isinstance(bad, PoisonedDecodeError), bad
        assert good_1 == good_2 == alone.text
        assert not async_engine.is_dead
        assert asyncio.run(asyncio.wait_for(consume(healthy, "a-after"), 60)) == alone.text
    finally:
        async_engine.shutdown()  # also closes the shared engine (last test of the module; close is idempotent)
