"""Batched token sampler: grammar masks, penalties, temperature, top-k, top-p, seeded generators, logprobs."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from engine.batch import to_device
from engine.sampling_params import SamplingParams
from engine.structured_output import Grammar, GrammarMask


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


class SampledTokens:
    """One step's samples, still on the device: ``token_ids [N]`` feeds the next step's forward directly;
    :meth:`result` brings ids and logprobs to the host (copies started at construction, waited for there)."""

    def __init__(
        self, token_ids: torch.Tensor, logprob_rows: list[int], logprob_tensors: tuple, logprob_counts: list[int]
    ) -> None:
        self.token_ids = token_ids
        self._logprob_rows = logprob_rows
        self._logprob_counts = logprob_counts
        device = token_ids.device
        pin = device.type == "cuda"
        tensors = (token_ids, *logprob_tensors)
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in tensors]
        for host, t in zip(self._host, tensors):
            host.copy_(t, non_blocking=pin)
        self._event = None
        if pin:
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))
        self._output: SamplerOutput | None = None

    @classmethod
    def from_host(cls, output: SamplerOutput, device: torch.device) -> SampledTokens:
        """Samples already on the host (rows sampled one by one), their ids also put on ``device``."""
        samples = cls(to_device(output.token_ids, torch.int64, device), [], (), [])
        samples._output = output
        return samples

    def result(self) -> SamplerOutput:
        """Wait for the copies and return the ids and logprobs as Python values."""
        if self._output is not None:
            return self._output
        if self._event is not None:
            self._event.synchronize()
        token_ids = self._host[0].tolist()
        logprobs: list[dict | None] = [None] * len(token_ids)
        if self._logprob_rows:
            chosen, top_values, top_ids = (t.tolist() for t in self._host[1:])
            for j, (i, k) in enumerate(zip(self._logprob_rows, self._logprob_counts)):
                logprobs[i] = {
                    "token_id": token_ids[i],
                    "logprob": chosen[j],
                    "top": list(zip(top_ids[j][:k], top_values[j][:k])),
                }
        return SamplerOutput(token_ids, logprobs)


class Sampler:
    """Turns one row of logits per sequence into one next token per sequence.

    A row with a grammar (structured output) first loses every token its grammar does not allow next. Greedy
    rows (temperature 0) take the argmax of the penalized logits. Random rows sample with the exponential race
    ``argmax(probs / Exp(1))``, which draws exactly from ``probs``; the Exp(1) noise of a seeded request comes
    from its own ``torch.Generator``, so its tokens do not depend on which other requests share the batch.
    """

    def __init__(self, device: str | torch.device = "cpu", seed: int | None = None) -> None:
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(random.getrandbits(63) if seed is None else seed)
        self._grammar_mask = GrammarMask()

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        grammars: list[Grammar | None] | None = None,
    ) -> SamplerOutput:
        """Sample one token per row and wait for the result (see :meth:`sample`)."""
        return self.sample(logits, params, output_token_ids, generators, grammars).result()

    @torch.inference_mode()
    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        grammars: list[Grammar | None] | None = None,
    ) -> SampledTokens:
        """Sample one token per row on the logits' device, without waiting for it.

        Args:
            logits: [N, vocab] float logits (raw model output).
            params: [N] sampling parameters per row.
            output_token_ids: [N] tokens generated so far per row (for presence/frequency penalties).
            generators: [N] per-request generator for seeded rows, else ``None``.
            grammars: [N] each row's grammar, advanced to its whole output (``None``: a free row); None: no grammar.
        """
        num_rows, vocab_size = logits.shape
        grammars = grammars if grammars is not None else [None] * num_rows
        if not (len(params) == len(output_token_ids) == len(generators) == len(grammars) == num_rows):
            raise ValueError(
                f"sampler got {num_rows} logit rows but {len(params)} params, "
                f"{len(output_token_ids)} histories, {len(generators)} generators, {len(grammars)} grammars"
            )
        device = logits.device
        logits = logits.float()
        raw_logits = logits

        if any(g is not None for g in grammars):
            logits = logits.clone()  # logprobs are read from the raw logits
            self._grammar_mask.apply(logits, grammars)

        penalized_rows = [i for i, p in enumerate(params) if p.has_penalties and output_token_ids[i]]
        if penalized_rows:
            if logits is raw_logits:
                logits = logits.clone()
            for i in penalized_rows:
                history = to_device(output_token_ids[i], torch.long, device)
                counts = torch.bincount(history, minlength=vocab_size).to(logits.dtype)
                logits[i] -= params[i].frequency_penalty * counts + params[i].presence_penalty * (counts > 0)

        token_ids = torch.argmax(logits, dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            rows = to_device(random_rows, torch.long, device) if len(random_rows) < num_rows else None
            sampled = self._sample_random(
                logits if rows is None else logits[rows],
                [params[i] for i in random_rows],
                [generators[i] for i in random_rows],
            )
            if rows is None:
                token_ids = sampled
            else:
                token_ids[rows] = sampled

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprob_tensors: tuple = ()
        if logprob_rows:
            logprob_tensors = self._logprobs(
                raw_logits, token_ids, logprob_rows, max(params[i].logprobs for i in logprob_rows)
            )
        return SampledTokens(token_ids, logprob_rows, logprob_tensors, [params[i].logprobs for i in logprob_rows])

    def _sample_random(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """logits: [M, vocab] -> [M] sampled ids."""
        num_rows, vocab_size = logits.shape
        device = logits.device
        temperatures = to_device([p.temperature for p in params], logits.dtype, device)
        logits = logits / temperatures[:, None]
        # Sorting the vocabulary is the costly part: only for the rows that truncate it.
        truncated = [i for i, p in enumerate(params) if p.top_k != -1 or p.top_p < 1.0]
        if truncated:
            rows = to_device(truncated, torch.long, device)
            logits[rows] = _apply_top_k_top_p(logits[rows], [params[i] for i in truncated])
        probs = torch.softmax(logits, dim=-1)

        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            rows = to_device(unseeded, torch.long, device)
            noise[rows] = torch.empty(len(unseeded), vocab_size, dtype=probs.dtype, device=device).exponential_(
                generator=self._generator
            )
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        return torch.argmax(probs / noise, dim=-1)

    @staticmethod
    def _logprobs(raw_logits: torch.Tensor, token_ids: torch.Tensor, rows: list[int], max_top: int) -> tuple:
        """``(chosen [M], top_values [M, max_top], top_ids [M, max_top])`` for the rows asking for logprobs:
        log-softmax of the raw logits at the sampled token and at the most likely ones, on the device."""
        index = to_device(rows, torch.long, raw_logits.device)
        logprobs = torch.log_softmax(raw_logits[index], dim=-1)
        chosen = logprobs.gather(1, token_ids[index].unsqueeze(1)).squeeze(1)
        if max_top > 0:
            top_values, top_ids = torch.topk(logprobs, max_top, dim=-1)
        else:
            top_values, top_ids = logprobs[:, :0], logprobs[:, :0].long()
        return chosen, top_values, top_ids


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) every token outside each row's top-k and top-p nucleus.

    logits: [M, vocab] temperature-scaled logits -> [M, vocab]. The most likely token always survives.
    """
    num_rows, vocab_size = logits.shape
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)
    top_k = to_device(
        [vocab_size if p.top_k == -1 else min(p.top_k, vocab_size) for p in params], torch.long, logits.device
    )
    positions = torch.arange(vocab_size, device=logits.device)
    sorted_logits = sorted_logits.masked_fill(positions[None, :] >= top_k[:, None], float("-inf"))

    # top_p == 1 means off: 2.0 is above any cumulative mass, so float rounding never masks a tail token.
    top_p = to_device([p.top_p if p.top_p < 1.0 else 2.0 for p in params], logits.dtype, logits.device)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Mass strictly before each token: a token is kept while the mass before it is below top_p.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))

    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_ids, sorted_logits)
