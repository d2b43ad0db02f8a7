"""LLMEngine end to end on the embedded SmolLM2-135M-Instruct, against transformers' generate."""

from dataclasses import replace

import pytest
import torch

from engine.config import EngineConfig
from engine.errors import InvalidRequestError, PromptTooLongError
from engine.greedy_check import greedy_shortfall
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

MAX_NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)

_HISTORY = (
    "The history of the city goes back to a small fishing village on the river bank. "
    "Over the centuries it grew into a market town, then an industrial centre with mills and railways. "
)
_STORY = " ".join(
    f"On day {i}, the traveller walked {i * 3 % 17 + 2} miles north, met a {['baker', 'poet', 'sailor', 'smith'][i % 4]} "
    f"and wrote about the {['rain', 'hills', 'market', 'river', 'stars'][i % 5]} in a notebook."
    for i in range(1, 13)
)


def prompts(tokenizer) -> list:
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return [
        "Hi",
        "The capital of France is",
        chat,
        "def fibonacci(n):\n    ",
        "Emojis 🎉🚀 and accents: café, naïve. Continue:",
        _HISTORY * 2 + "In summary,",
        _STORY + " The next day,",
        (_STORY + " ") * 2 + "Finally,",
        "List three colours:",
    ]


@pytest.fixture(scope="module")
def engine():
    # A small chunk budget forces long prompts through several chunked-prefill steps.
    config = EngineConfig.from_dict(
        {"max_batch_size": 16, "max_seq_len": 1024, "max_num_batched_tokens": 96, "sampler_seed": 0}
    )
    eng = LLMEngine(config)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(engine):
    """Greedy continuations from transformers' generate, same weights (the converted SmolLM2 dir)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(engine.runner.resolved.weights_dir), dtype=torch.float32)
    model.eval()
    refs = []
    for prompt in prompts(engine.tokenizer):
        ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=2)
        refs.append(out[0, len(ids) :].tolist())
    return refs


def run_to_completion(engine, limit_steps=2000):
    finals, streamed = {}, {}
    for _ in range(limit_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            streamed.setdefault(out.request_id, []).append(out)
            if out.finished:
                finals[out.request_id] = out
    assert not engine.has_unfinished()
    return finals, streamed


def test_prompts_span_very_different_lengths(engine):
    lengths = sorted(len(engine.tokenizer.encode(p) if isinstance(p, str) else p) for p in prompts(engine.tokenizer))
    assert lengths[0] <= 2 and lengths[-1] >= 600 and len(lengths) >= 8


def test_greedy_one_by_one_equals_transformers(engine, reference):
    for prompt, ref in zip(prompts(engine.tokenizer), reference):
        [out] = engine.generate([prompt], GREEDY)
        assert out.token_ids == ref, (prompt if isinstance(prompt, str) else "chat", out.text)
        assert out.finished and out.finish_reason in ("stop", "length")
        expected_reason = "stop" if ref[-1] in engine.eos_token_ids and len(ref) <= MAX_NEW_TOKENS else "length"
        assert out.finish_reason == expected_reason
        if not isinstance(prompt, str):  # the chat prompt answers and stops at EOS
            assert out.text == "The capital of France is Paris."
            assert out.finish_reason == "stop" and out.stop_reason is None


def test_concurrent_staggered_requests_with_chunked_prefill_equal_transformers(engine, reference):
    ps = prompts(engine.tokenizer)
    jobs = [(f"c{i}", ps[i % len(ps)], reference[i % len(ps)]) for i in range(18)]  # 18 > 16 slots
    finals, streamed = {}, {}
    pending = list(jobs)
    steps = 0
    while pending or engine.has_unfinished():
        for _ in range(2):  # two arrivals per step
            if pending:
                request_id, prompt, _ = pending.pop(0)
                engine.add_request(request_id, prompt, GREEDY)
        for out in engine.step():
            streamed.setdefault(out.request_id, []).append(out)
            if out.finished:
                finals[out.request_id] = out
        steps += 1
        assert engine.scheduler.num_running <= 16
        assert steps < 2000
    assert engine.stats().num_running == 0 and engine.stats().num_free_slots == 16
    for request_id, _, ref in jobs:
        out = finals[request_id]
        assert out.token_ids == ref, request_id
        chunks = streamed[request_id]
        assert [t for o in chunks for t in o.new_token_ids] == ref
        assert "".join(o.new_text for o in chunks) == out.text
        assert all("\ufffd" not in o.new_text for o in chunks)
        assert sum(o.finished for o in chunks) == 1


def test_preemption_under_a_tiny_page_pool_keeps_greedy_outputs(engine):
    stats = engine.stats()
    num_buffers = 2 * engine.runner.hf_config.num_hidden_layers
    page_rows = 5  # the pool holds 5 pages per layer K/V: 5 * 85 tokens in all
    config = EngineConfig.from_dict(
        {
            "max_batch_size": 6,
            "max_seq_len": 1024,
            "max_num_batched_tokens": 64,
            "kv_cache_memory_bytes": page_rows * num_buffers * stats.page_size_bytes,
        }
    )
    # 77-token prompts fit one page row when admitted, then cross into a second one while decoding:
    # five of them fill the pool, so their growth must preempt.
    ps = [f"Story {i}: " + _HISTORY * 2 for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate(ps, params)]  # roomy pool: no preemption
    assert engine.stats().num_preemptions == 0
    small = LLMEngine(config)
    try:
        assert all(small.kv_cache.pages_for_tokens(len(small.tokenizer.encode(p))) == num_buffers for p in ps)
        outs = small.generate(ps, params)
        assert [o.token_ids for o in outs] == expected
        stats = small.stats()
        assert stats.num_preemptions > 0
        assert stats.num_total_pages == page_rows * num_buffers
        assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_slots == 6

        # A prompt needing more pages than the whole pool is rejected up front, not queued forever.
        long_prompt = prompts(small.tokenizer)[7]
        assert len(small.tokenizer.encode(long_prompt)) > page_rows * stats.tokens_per_page
        with pytest.raises(PromptTooLongError) as info:
            small.add_request("too-big", long_prompt, params)
        assert "pages" in str(info.value)
        assert not small.has_unfinished()
    finally:
        small.shutdown()


def test_prompt_beyond_max_seq_len_is_rejected(engine):
    too_long = [100] * 1020
    with pytest.raises(PromptTooLongError) as info:
        engine.add_request("long-1", too_long, SamplingParams(max_tokens=16))
    assert info.value.param == "max_tokens"
    with pytest.raises(PromptTooLongError) as info:
        engine.add_request("long-2", [100] * 1025, SamplingParams(max_tokens=None))
    assert info.value.param == "prompt"
    # max_tokens=None takes whatever the context leaves.
    engine.add_request("long-3", [100] * 1020, SamplingParams(max_tokens=None))
    assert [r.max_tokens for r in engine.requests["long-3"]] == [4]
    engine.abort("long-3")
    engine.step()
    assert not engine.has_unfinished()


def test_invalid_requests_raise_and_leave_the_engine_usable(engine):
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad-1", "", GREEDY)
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad-2", [1, 2, 10**9], GREEDY)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad-3", "hello", _mutated(top_p=0.0))
    assert info.value.param == "top_p"
    engine.add_request("dup", "hello", GREEDY)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("dup", "hello", GREEDY)
    assert info.value.param == "request_id"
    finals, _ = run_to_completion(engine)
    assert finals["dup"].num_output_tokens > 0


def _mutated(**changes) -> SamplingParams:
    params = SamplingParams()
    for key, value in changes.items():
        setattr(params, key, value)
    return params


def test_max_tokens_stop_strings_and_stop_token_ids(engine, reference):
    ps = prompts(engine.tokenizer)
    ref_ids = reference[6]  # story continuation: no EOS in 20 tokens
    ref_text = engine.tokenizer.decode(ref_ids, skip_special_tokens=True)

    [out] = engine.generate([ps[6]], SamplingParams(temperature=0, max_tokens=5))
    assert out.finish_reason == "length" and out.token_ids == ref_ids[:5] and out.stop_reason is None

    stop = ref_text[len(ref_text) // 2 : len(ref_text) // 2 + 4]
    assert stop.strip()
    [out] = engine.generate([ps[6]], SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, stop=["@@never@@", stop]))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == ref_text[: ref_text.index(stop)]
    assert stop not in out.text

    stop_id = ref_ids[3]
    [out] = engine.generate([ps[6]], SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, stop_token_ids=[stop_id]))
    first = ref_ids.index(stop_id)
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == ref_ids[: first + 1]
    assert out.text == engine.tokenizer.decode(ref_ids[:first], skip_special_tokens=True)

    # ignore_eos runs past EOS to max_tokens.
    [out] = engine.generate([ps[2]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert out.num_output_tokens == 12 and out.finish_reason == "length"
    assert out.token_ids[: len(reference[2])] == reference[2]


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    [alone] = engine.generate(["Write a poem about the sea."], seeded)
    batch = engine.generate(
        ["Tell me a joke.", "Write a poem about the sea.", "Hi"],
        [SamplingParams(temperature=1.0, max_tokens=10), seeded, SamplingParams(temperature=0.8, max_tokens=20)],
    )
    assert batch[1].token_ids == alone.token_ids
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=99, ignore_eos=True)
    [other] = engine.generate(["Write a poem about the sea."], other_seed)
    assert other.token_ids != alone.token_ids


def test_n_samples_are_seeded_per_index_tokenized_once_and_admitted_together(engine, monkeypatch):
    prompt = "Write a poem about the sea."
    seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True)
    alone = [engine.generate([prompt], replace(seeded, seed=1234 + i))[0] for i in range(4)]
    encode = engine.tokenizer.encode
    calls = []
    monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    engine.add_request("n4", prompt, replace(seeded, n=4))
    assert len(calls) == 1 and [r.index for r in engine.requests["n4"]] == [0, 1, 2, 3]
    engine.step()
    assert engine.scheduler.num_running == 4 and engine.scheduler.num_waiting == 0  # one prefill step for all 4
    finals, streamed = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == "n4"
            streamed.setdefault(out.index, []).append(out)
            if out.finished:
                finals[out.index] = out
    assert sorted(finals) == [0, 1, 2, 3] and "n4" not in engine.requests
    # Sample i is the request seeded with seed + i: 4 different samples, each reproducible.
    assert [finals[i].token_ids for i in range(4)] == [a.token_ids for a in alone]
    assert len({tuple(a.token_ids) for a in alone}) == 4
    assert all(sum(o.finished for o in streamed[i]) == 1 for i in range(4))
    # generate() gives a prompt's n outputs in a row, by index.
    outs = engine.generate(["Hi", prompt], [GREEDY, replace(seeded, n=4)])
    assert [(o.request_id == outs[1].request_id, o.index) for o in outs[1:]] == [(True, i) for i in range(4)]
    assert [o.token_ids for o in outs[1:]] == [a.token_ids for a in alone]


def test_abort_stops_every_sample_of_a_request(engine):
    engine.add_request("n3", "Tell me a long story.", SamplingParams(n=3, max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_running == 3
    assert engine.abort("n3") and not engine.abort("n3")
    outs = engine.step()
    assert sorted((o.index, o.finish_reason) for o in outs if o.finished) == [(i, "abort") for i in range(3)]
    assert not engine.has_unfinished() and "n3" not in engine.requests


def test_logprobs_match_transformers_log_softmax(engine):
    from transformers import AutoModelForCausalLM

    prompt = "The capital of France is"
    [out] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=3, logprobs=5))
    assert len(out.new_logprobs) == 3
    model = AutoModelForCausalLM.from_pretrained(str(engine.runner.resolved.weights_dir), dtype=torch.float32)
    ids = engine.tokenizer.encode(prompt) + out.token_ids
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)
    n = len(engine.tokenizer.encode(prompt))
    for k, entry in enumerate(out.new_logprobs):
        row = expected[n - 1 + k]
        assert entry["token_id"] == out.token_ids[k] == int(row.argmax())
        assert entry["logprob"] == pytest.approx(row[entry["token_id"]].item(), abs=2e-3)
        assert [t for t, _ in entry["top"]] == torch.topk(row, 5).indices.tolist()


def test_abort_frees_the_slot_and_reports_abort(engine):
    engine.add_request(
        "to-abort", "Tell me a long story about dragons.", SamplingParams(max_tokens=200, ignore_eos=True)
    )
    for _ in range(3):
        engine.step()
    assert engine.stats().num_running == 1
    assert engine.abort("to-abort")
    assert not engine.abort("to-abort")
    assert engine.stats().num_running == 0
    outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [("to-abort", True, "abort")]
    assert not engine.has_unfinished()
    # Given back at once, or (asynchronous scheduling) once the step in flight that wrote into it is done.
    assert engine.stats().num_free_slots == 16


def test_stats_reflect_pages_and_slots(engine):
    stats = engine.stats()
    d = stats.as_dict()
    assert d["num_free_pages"] + d["num_mapped_pages"] == d["num_total_pages"]
    assert d["max_batch_size"] == 16 and d["page_size_bytes"] == 65536
    assert 0.0 <= d["kv_usage"] <= 1.0


def test_asynchronous_scheduling_changes_no_output(engine):
    """The module's engine launches each step before the previous step's tokens reach the host; an engine
    that processes every step's tokens first must produce exactly the same outputs: stops found one step
    late (EOS, stop strings, stop token ids), one-token requests, seeded sampling, logprobs, and penalties
    (which make the engine process the step in flight before scheduling)."""
    sync = LLMEngine(
        EngineConfig.from_dict(
            {
                "max_batch_size": 16,
                "max_seq_len": 1024,
                "max_num_batched_tokens": 96,
                "sampler_seed": 0,
                "async_scheduling": False,
            }
        )
    )
    ps = prompts(engine.tokenizer)
    params = [
        SamplingParams(temperature=0.0, max_tokens=40),  # may stop on EOS
        SamplingParams(temperature=0.0, max_tokens=24, stop=[" Paris", "."]),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=7),
        SamplingParams(temperature=0.0, max_tokens=12, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[13, 30]),
        SamplingParams(temperature=0.0, max_tokens=16, frequency_penalty=1.5),
        SamplingParams(temperature=0.7, top_k=20, max_tokens=16, seed=3, presence_penalty=0.5),
        SamplingParams(temperature=0.0, max_tokens=30),
    ]
    try:

        def summary(outs):
            return [
                (
                    o.token_ids,
                    o.text,
                    o.finish_reason,
                    o.stop_reason,
                    [(lp["token_id"], round(lp["logprob"], 4)) for lp in o.new_logprobs or []],
                )
                for o in outs
            ]

        expected = summary(sync.generate(ps, params))
        assert summary(engine.generate(ps, params)) == expected
        assert any(reason == "stop" for _, _, reason, _, _ in expected)  # some stop was found late
        for e in (engine, sync):
            stats = e.stats()
            assert stats.num_running == stats.num_waiting == 0 and stats.num_free_slots == 16
            assert stats.num_free_pages + stats.num_reclaimable_pages == stats.num_total_pages
    finally:
        sync.shutdown()


@pytest.mark.gpu
def test_asynchronous_scheduling_on_the_gpu_changes_no_output():
    """On the GPU (bf16: decode replayed from CUDA graphs) the next step really runs ahead of the host (graphs reading
    device-side ids, slots held back while in flight).

    8 requests admitted together run in the same batches either way: same tokens as processing each step first.
    40 requests through a pool that holds 8 at a time (a 2 MiB page of each of the 4 K/V buffers each) reuse finished
    requests' slots and pages while the next step is in flight; their batches differ from the synchronous run's
    (slots come back once the step that used them is done), so each output is checked against the model itself:
    every token is its greedy choice given the tokens before it."""
    eng = LLMEngine(
        EngineConfig.from_dict(
            {
                "model": "dummy:tiny-llama",
                "device": "cuda",
                "dtype": "bfloat16",
                "max_batch_size": 17,
                "max_seq_len": 512,
                "max_num_batched_tokens": 256,
                "kv_cache_memory_bytes": 8 * 4 * (2 << 20),
                "kv_cache_layout": "layer_major",
            }
        )
    )
    try:
        assert eng.runner.graph_runner is not None
        gen = torch.Generator().manual_seed(0)
        ps = [
            torch.randint(10, 1000, (int(n),), generator=gen).tolist()
            for n in torch.randint(5, 300, (40,), generator=gen)
        ]
        params = [
            SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True)
            for n in torch.randint(1, 120, (40,), generator=gen)
        ]
        outs = {}
        for mode in (True, False):
            eng.async_scheduling = mode
            outs[mode] = [o.token_ids for o in eng.generate(ps[:8], params[:8])]
        assert outs[True] == outs[False]

        eng.async_scheduling = True
        outs = [o.token_ids for o in eng.generate(ps, params)]
        assert [len(o) for o in outs] == [p.max_tokens for p in params]
        # A wrong input token or overwritten K/V moves the choice far more than the kernels' bf16 rounding does.
        shortfalls = [greedy_shortfall(eng, p, o) for p, o in zip(ps, outs)]
        assert max(shortfalls) <= 0.03, [round(x, 4) for x in shortfalls]
        stats = eng.stats()
        assert stats.num_running == stats.num_waiting == 0 and stats.num_free_slots == 17
        assert stats.num_free_pages + stats.num_reclaimable_pages == stats.num_total_pages
    finally:
        eng.shutdown()


def test_token_major_layout_gives_the_same_tokens_under_preemption(engine):
    """Every layer's K and V of a token side by side in one buffer (strided per-layer views): the same greedy
    tokens as the module's layer-major engine, through chunked prefill and preemption from a small pool."""
    ps = [f"Story {i}: " + _HISTORY * 2 for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate(ps, params)]
    hf = engine.runner.hf_config
    token_bytes = 2 * hf.num_hidden_layers * hf.num_key_value_heads * (hf.hidden_size // hf.num_attention_heads) * 4
    small = LLMEngine(
        EngineConfig.from_dict(
            {
                "max_batch_size": 6,
                "max_seq_len": 1024,
                "max_num_batched_tokens": 64,
                "kv_cache_layout": "token_major",
                "kv_cache_memory_bytes": 5 * 85 * token_bytes,
            }
        )
    )  # ~5 x 85 tokens: six ~93-token requests must preempt
    try:
        assert small.kv_cache.num_buffers == 1
        assert [o.token_ids for o in small.generate(ps, params)] == expected
        stats = small.stats()
        assert stats.num_preemptions > 0
        assert stats.num_running == stats.num_waiting == 0 and stats.num_free_slots == 6
        assert stats.num_free_pages + stats.num_reclaimable_pages == stats.num_total_pages
    finally:
        small.shutdown()


@pytest.mark.gpu
def test_gpu_batch_slots_default_to_the_pool_and_serve_more_than_the_graphs_cover():
    """No ``max_batch_size`` on the GPU: the cache takes 1024 slots (its pool holds more requests at a page each), 700
    requests run in one batch (beyond the 512 rows decode graphs cover, so those steps run eagerly), and every token
    is the model's greedy choice."""
    eng = LLMEngine(
        EngineConfig.from_dict(
            {
                "model": "dummy:tiny-llama",
                "device": "cuda",
                "dtype": "bfloat16",
                "max_seq_len": 512,
                "max_num_batched_tokens": 8192,
                "kv_cache_memory_bytes": 1100 * (2 << 20),
            }
        )
    )
    try:
        assert eng.kv_cache.config.max_batch_size == 1024 and eng.stats().max_batch_size == 1024
        gen = torch.Generator().manual_seed(3)
        ps = [
            torch.randint(10, 1000, (int(n),), generator=gen).tolist()
            for n in torch.randint(5, 40, (700,), generator=gen)
        ]
        params = [
            SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True)
            for n in torch.randint(16, 30, (700,), generator=gen)
        ]
        for i, (p, sp) in enumerate(zip(ps, params)):
            eng.add_request(str(i), p, sp)
        outs, most_running = {}, 0
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    outs[int(o.request_id)] = o.token_ids
            most_running = max(most_running, eng.stats().num_running)
        assert most_running == 700
        assert [len(outs[i]) for i in range(700)] == [sp.max_tokens for sp in params]
        shortfalls = [greedy_shortfall(eng, ps[i], outs[i]) for i in range(0, 700, 35)]
        assert max(shortfalls) <= 0.03, [round(x, 4) for x in shortfalls]
        stats = eng.stats()
        assert stats.num_running == stats.num_waiting == 0 and stats.num_free_slots == 1024
        assert stats.num_free_pages + stats.num_reclaimable_pages == stats.num_total_pages
    finally:
        eng.shutdown()
