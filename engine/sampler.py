"""Batched token sampler: penalties, temperature, top-k, top-p, seeded generators, logprobs."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    """What the sampler picked for each of the N rows it was given.

    Attributes:
        token_ids: [N] sampled token ids.
        logprobs: [N] entries; ``None`` for a row that did not ask for logprobs, else
            ``{"token_id": int, "logprob": float, "top": [(token_id, logprob), ...]}`` with the
            requested number of most likely alternatives, log-softmax of the model's raw logits.
    """

    token_ids: list[int]
    logprobs: list[dict | None]


class Sampler:
    """Turns one row of logits per sequence into one next token per sequence.

    Greedy rows (temperature 0) take the argmax of the penalized logits. Random rows sample with the
    exponential race ``argmax(probs / Exp(1))``, which draws exactly from ``probs``; the Exp(1) noise of
    a seeded request comes from its own ``torch.Generator``, so its tokens do not depend on which other
    requests share the batch.
    """

    def __init__(self, device: str | torch.device = "cpu", seed: int | None = None) -> None:
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(random.getrandbits(63) if seed is None else seed)

    @torch.inference_mode()
    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
    ) -> SamplerOutput:
        """Sample one token per row.

        Args:
            logits: [N, vocab] float logits (raw model output).
            params: [N] sampling parameters per row.
            output_token_ids: [N] tokens generated so far per row (for presence/frequency penalties).
            generators: [N] per-request generator for seeded rows, else ``None``.
        """
        num_rows, vocab_size = logits.shape
        if not (len(params) == len(output_token_ids) == len(generators) == num_rows):
            raise ValueError(
                f"sampler got {num_rows} logit rows but {len(params)} params, "
                f"{len(output_token_ids)} histories, {len(generators)} generators"
            )
        logits = logits.float()
        raw_logits = logits

        penalized_rows = [i for i, p in enumerate(params) if p.has_penalties and output_token_ids[i]]
        if penalized_rows:
            logits = logits.clone()
            for i in penalized_rows:
                history = torch.tensor(output_token_ids[i], dtype=torch.long, device=logits.device)
                counts = torch.bincount(history, minlength=vocab_size).to(logits.dtype)
                logits[i] -= params[i].frequency_penalty * counts + params[i].presence_penalty * (counts > 0)

        token_ids = torch.argmax(logits, dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            token_ids[random_rows] = self._sample_random(
                logits[random_rows],
                [params[i] for i in random_rows],
                [generators[i] for i in random_rows],
            )

        token_ids_list = token_ids.tolist()
        return SamplerOutput(token_ids_list, self._logprobs(raw_logits, params, token_ids_list))

    def _sample_random(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """logits: [M, vocab] -> [M] sampled ids."""
        num_rows, vocab_size = logits.shape
        temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
        logits = logits / temperatures[:, None]
        # Sorting the vocabulary is the costly part: only for the rows that truncate it.
        truncated = [i for i, p in enumerate(params) if p.top_k != -1 or p.top_p < 1.0]
        if truncated:
            logits[truncated] = _apply_top_k_top_p(logits[truncated], [params[i] for i in truncated])
        probs = torch.softmax(logits, dim=-1)

        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), vocab_size, dtype=probs.dtype, device=probs.device).exponential_(
                generator=self._generator
            )
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        return torch.argmax(probs / noise, dim=-1)

    @staticmethod
    def _logprobs(raw_logits: torch.Tensor, params: list[SamplingParams], token_ids: list[int]) -> list[dict | None]:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        result: list[dict | None] = [None] * len(params)
        if not rows:
            return result
        logprobs = torch.log_softmax(raw_logits[rows], dim=-1)
        chosen = logprobs.gather(1, torch.tensor([[token_ids[i]] for i in rows], device=logprobs.device))
        max_top = max(params[i].logprobs for i in rows)
        top_values, top_ids = (
            torch.topk(logprobs, max_top, dim=-1) if max_top > 0 else (logprobs[:, :0], logprobs[:, :0].long())
        )
        chosen, top_values, top_ids = chosen.cpu().tolist(), top_values.cpu().tolist(), top_ids.cpu().tolist()
        for j, i in enumerate(rows):
            k = params[i].logprobs
            result[i] = {
                "token_id": token_ids[i],
                "logprob": chosen[j][0],
                "top": list(zip(top_ids[j][:k], top_values[j][:k])),
            }
        return result


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) every token outside each row's top-k and top-p nucleus.

    logits: [M, vocab] temperature-scaled logits -> [M, vocab]. The most likely token always survives.
    """
    num_rows, vocab_size = logits.shape
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)
    top_k = torch.tensor(
        [vocab_size if p.top_k == -1 else min(p.top_k, vocab_size) for p in params], device=logits.device
    )
    positions = torch.arange(vocab_size, device=logits.device)
    sorted_logits = sorted_logits.masked_fill(positions[None, :] >= top_k[:, None], float("-inf"))

    # top_p == 1 means off: 2.0 is above any cumulative mass, so float rounding never masks a tail token.
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], dtype=logits.dtype, device=logits.device)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Mass strictly before each token: a token is kept while the mass before it is below top_p.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))

    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_ids, sorted_logits)
