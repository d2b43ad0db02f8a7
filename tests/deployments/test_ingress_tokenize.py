"""The ingress tokenizes a long text off its event loop (with throughput-optimized Serve that loop also relays the
replica's other streams), with the same ids as inline, without a cluster."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from deployments.ingress import OFF_LOOP_TOKENIZE_CHARS, OpenAIIngress
from deployments.protocol import OpenAIError
from engine.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def ingress():
    return SimpleNamespace(_tokenizer=load_tokenizer("smollm2"))


def tokenize_while_ticking(ingress, text: str) -> tuple[list[int], int]:
    """The ids of ``text`` through the ingress, and how often a 1 ms ticker ran on the loop meanwhile."""

    async def run():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        ticks = 0
        ids = await OpenAIIngress._tokenize(ingress, text, "prompt")
        done.set()
        await task
        return ids, ticks

    return asyncio.run(run())


def test_a_long_text_is_tokenized_while_the_event_loop_runs(ingress):
    text = "The quick brown fox jumps over the lazy dog, again and again. " * 12000  # 0.75 MB: ~0.4 s of encoding
    ids, ticks = tokenize_while_ticking(ingress, text)
    assert ids == list(ingress._tokenizer(text)["input_ids"])
    # Inline, the ticker would not run at all until the tokenizer returned.
    assert ticks >= 20, ticks


def test_a_short_text_is_tokenized_inline_with_the_same_ids(ingress):
    text = "What is the capital of France?"
    assert len(text) <= OFF_LOOP_TOKENIZE_CHARS
    ids, _ = tokenize_while_ticking(ingress, text)
    assert ids == list(ingress._tokenizer(text)["input_ids"])


@pytest.mark.parametrize("size", [10, 2 * OFF_LOOP_TOKENIZE_CHARS])
def test_text_that_is_not_unicode_is_refused_either_way(ingress, size):
    with pytest.raises(OpenAIError, match="not valid Unicode"):
        asyncio.run(OpenAIIngress._tokenize(ingress, "a" * size + "\ud800", "prompt"))
