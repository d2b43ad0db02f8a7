"""Prefix caching end to end: the same greedy tokens with caching on and off (real SmolLM2 and a tiny Llama, both
layouts, through chunked prefill, preemption, aborts and eviction), cached tokens reported, the pool balanced."""

import functools

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

SYSTEM = (
    "You are a careful assistant for a city library. The library opens at nine and closes at six, except on "
    "Sundays. Members may borrow twelve books for three weeks; renewals are possible twice unless another member "
    "has reserved the book. Fines are ten cents a day. The reading room is quiet; group rooms can be booked. "
) * 6
QUESTIONS = ["When does it open?", "How many books?", "What are the fines?", "Can I renew?", "Group rooms?"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _engine(layout: str, prefix_caching: bool, **overrides) -> LLMEngine:
    values = {
        "max_batch_size": 6,
        "max_seq_len": 1024,
        "max_num_batched_tokens": 128,
        "kv_cache_layout": layout,
        "enable_prefix_caching": prefix_caching,
    }
    values.update(overrides)
    return LLMEngine(EngineConfig.from_dict(values))


def _run(engine: LLMEngine, prompts, waves: int = 2, params: SamplingParams = GREEDY) -> list[list[int]]:
    """Each prompt ``waves`` times, one wave after the other (later waves find the earlier ones' blocks)."""
    tokens = []
    for _ in range(waves):
        tokens += [o.token_ids for o in engine.generate(prompts, params)]
    return tokens


def _assert_balanced(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_pages + stats.num_reclaimable_pages == stats.num_total_pages


@functools.cache
def _greedy_without_caching(prompts: tuple[str, ...], max_tokens: int, waves: int = 1) -> list[list[int]]:
    """The greedy tokens with caching off (``_run``'s). Each layout gives the same greedy tokens (``test_llm_engine``):
    one run serves the tests of both."""
    engine = _engine("layer_major", False)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        tokens = _run(engine, list(prompts), waves=waves, params=params)
        assert engine.stats().prefix_cache_hits == 0
        return tokens
    finally:
        engine.shutdown()


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_same_greedy_tokens_with_prefix_caching_on_and_off(layout):
    prompts = [SYSTEM + q for q in QUESTIONS]
    expected = _greedy_without_caching(tuple(prompts), GREEDY.max_tokens, waves=2)  # no hits with caching off
    on = _engine(layout, True)
    try:
        assert _run(on, prompts) == expected
        stats = on.stats()
        block = on.kv_cache.block_tokens
        assert stats.prefix_cache_hits >= len(prompts) * block  # the second wave at least
        assert stats.prefix_cache_queries > stats.prefix_cache_hits
        _assert_balanced(on)
        on.kv_cache.reclaim()  # evicts every cached block: nothing is held any more
        assert on.stats().num_free_pages == on.stats().num_total_pages
        assert on.kv_cache.num_cached_blocks == 0
    finally:
        on.shutdown()


def test_a_burst_sharing_a_prefix_computes_it_once():
    """Sent together, prompts sharing a system prompt (and the n samples of one request) wait for the first one's
    prefill of the shared blocks and reuse them, with the tokens caching off gives."""
    prompts = [SYSTEM + q for q in QUESTIONS]
    expected = _greedy_without_caching(tuple(prompts), GREEDY.max_tokens, waves=2)[: len(prompts)]  # its first wave
    on = _engine("token_major", True, max_num_batched_tokens=4096)  # room for every prompt in the first step
    try:
        assert _run(on, prompts, waves=1) == expected
        block = on.kv_cache.block_tokens
        shared = len(on.tokenizer.encode(SYSTEM)) // block * block
        assert on.stats().prefix_cache_hits >= (len(prompts) - 1) * shared
        params = SamplingParams(temperature=0.8, max_tokens=4, n=4, seed=1)
        outs = on.generate([QUESTIONS[0] + SYSTEM], params)
        assert (
            sorted(o.num_cached_tokens for o in outs)[1:] == [(len(outs[0].prompt_token_ids) - 1) // block * block] * 3
        )
    finally:
        on.shutdown()


def test_cached_tokens_are_reported_and_prefill_starts_after_them():
    engine = _engine("token_major", True)
    try:
        block = engine.kv_cache.block_tokens
        prompt = engine.tokenizer.encode(SYSTEM + QUESTIONS[0])
        first = engine.generate([prompt], GREEDY)[0]
        assert first.num_cached_tokens == 0
        again = engine.generate([prompt], GREEDY)[0]
        assert again.num_cached_tokens == (len(prompt) - 1) // block * block > 0
        assert again.token_ids == first.token_ids
        other = engine.generate([prompt[: 2 * block] + [42] * 30], GREEDY)[0]  # shares two blocks only
        assert other.num_cached_tokens == 2 * block
    finally:
        engine.shutdown()


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_preemption_aborts_and_eviction_keep_greedy_tokens(layout):
    """A pool too small for every request and every cached block: cached blocks are evicted, requests preempted as
    they grow and recomputed (finding their own blocks), some aborted mid-flight; survivors match caching off."""
    prompts = [SYSTEM + q for q in QUESTIONS[:2]] + [f"Story {i}: " + SYSTEM[i * 40 :] for i in range(2)]
    # 48 output tokens cross a page boundary (85 tokens per page in layer-major: the 400- to 407-token prompts fill
    # their fifth page after 20 to 27 of them; 64-token blocks in token-major, every ~1.4 tokens a page): growth must
    # preempt (the scheduler preempts only to grow a running request, never to admit one).
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    expected = _greedy_without_caching(tuple(prompts), params.max_tokens)
    probe = _engine(layout, True)
    need = probe.kv_cache.pages_for_tokens(len(probe.tokenizer.encode(SYSTEM)) + 8)
    page = probe.kv_cache.page_size_bytes
    probe.shutdown()
    on = _engine(layout, True, kv_cache_memory_bytes=2 * need * page)
    try:
        assert _run(on, prompts, waves=1, params=params) == expected
        assert on.stats().num_preemptions > 0
        # Aborts mid-prefill and mid-decode, while others run on.
        for i, p in enumerate(prompts):
            on.add_request(f"r{i}", p, params)
        finals = {}
        for step in range(2000):
            if step in (2, 30):
                on.abort(f"r{step // 28}")
            for out in on.step():
                if out.finished:
                    finals[out.request_id] = out
            if not on.has_unfinished():
                break
        for i in range(len(prompts)):
            out = finals[f"r{i}"]
            if out.finish_reason != "abort":
                assert out.token_ids == expected[i]
        assert sum(o.finish_reason == "abort" for o in finals.values()) == 2
        assert on.kv_cache.num_evicted_blocks > 0 and on.kv_cache.num_cached_blocks > 0
        _assert_balanced(on)
    finally:
        on.shutdown()


def test_tiny_llama_gives_the_same_tokens_with_caching(tmp_path):
    from tests.engine.tiny_checkpoints import TOKENIZER_VOCAB_SIZE, save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path, "llama", with_tokenizer=True, vocab_size=TOKENIZER_VOCAB_SIZE)
    prompts = [[5 + (i % 7) for i in range(130)] + [50 + q] * (3 + q) for q in range(4)]
    engines = [_engine("token_major", flag, model=str(tmp_path), max_seq_len=256) for flag in (False, True)]
    try:
        off, on = engines
        assert on.kv_cache.block_tokens <= 128  # 64 KiB host pages, 512-byte tokens
        assert _run(on, prompts) == _run(off, prompts)
        assert on.stats().prefix_cache_hits > 0
        assert off.stats().prefix_cache_hits == 0  # token-major with caching off (the helper's engine: layer-major)
    finally:
        for e in engines:
            e.shutdown()
