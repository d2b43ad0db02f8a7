"""How far a greedy generation is from the model's argmax, scored in one eager forward: the check that a fast path
(CUDA graphs, asynchronous scheduling, another cache layout or implementation) produced the tokens the model
prefers. Used by the tests and by the engine benchmarks next to their figures."""

from __future__ import annotations

import torch

from engine.llm_engine import LLMEngine


def engine_logits(engine: LLMEngine, tokens: list[int]) -> torch.Tensor:
    """Logits at every position of ``tokens``, ``[len(tokens), vocab]`` float32 on the device, from one eager
    forward of the engine's model over a slot of its cache (no request, no sampling). The engine must be idle."""
    runner, cache = engine.runner, engine.kv_cache
    slot = cache.allocate(len(tokens))
    try:
        with torch.inference_mode():
            batch = runner.build_batch([(slot, tokens, 0)])
            return runner.model.compute_logits(runner.model(batch, cache))
    finally:
        cache.record_use([slot]).wait()  # the forward is done with the slot's rows, whatever happened
        cache.free(slot)


def greedy_shortfall(engine: LLMEngine, prompt: list[int], output: list[int]) -> float:
    """How far below the best logit each generated token's logit is, at worst, scoring ``prompt + output`` in one
    eager forward over a slot of the engine's cache (0: every token was the argmax; bf16 kernels round
    differently: a few hundredths at near-ties). The engine must be idle (no request holding the slot it takes)."""
    logits = engine_logits(engine, prompt + output)[len(prompt) - 1 : -1]
    chosen = logits.gather(1, torch.tensor(output, device=logits.device)[:, None])[:, 0]
    return float((logits.max(dim=1).values - chosen).max())
