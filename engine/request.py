"""One generation request and its sequence state as it moves through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams
from engine.structured_output import Grammar

# Stands for a token sampled on the device but not read back yet; never a valid id, so a forward that was not
# given the device value fails loudly (embedding index out of range) instead of running a wrong token.
PLACEHOLDER_TOKEN_ID = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not holding a cache slot (new, or preempted and waiting to be recomputed)
    RUNNING = "running"  # holds a slot; prefilling in chunks or decoding
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_seq_len reached
    FINISHED_ABORTED = "abort"  # cancelled by the caller or failed

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass(eq=False)
class Request:
    """A request's tokens, progress and stopping state.

    The KV of ``all_token_ids[:num_computed_tokens]`` is in the cache slot ``slot``; the tokens from
    ``num_computed_tokens`` on are what the next forward must run (the whole prompt at first, one
    token while decoding). Preemption by recompute frees the slot and resets ``num_computed_tokens``
    to 0: the prompt and the output so far are run again as one longer prefill.

    With asynchronous scheduling a step is launched before the previous step's sampled tokens reach the
    host: such a token counts in ``num_tokens`` as a placeholder (``num_placeholder_tokens``, id
    ``PLACEHOLDER_TOKEN_ID`` in ``token_slice``) that the forward reads from the device.

    A caller's request with ``params.n`` > 1 is ``n`` such sequences sharing its ``request_id`` and prompt,
    told apart by ``index``.

    Attributes:
        index: which of the caller's ``n`` samples this sequence is (OpenAI's choice index).
        max_tokens: the effective output budget (``params.max_tokens`` or what ``max_seq_len`` leaves).
        generator: per-request ``torch.Generator`` when ``params.seed`` is set.
        grammar: the structured-output grammar (``params.json_schema``), advanced by every appended token.
        block_hashes: chained keys of the sequence's full blocks of known tokens so far (prefix caching).
        num_cached_tokens: prompt tokens whose KV was found cached when first admitted (None before).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    eos_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    index: int = 0
    generator: torch.Generator | None = None
    grammar: Grammar | None = None
    arrival_time: float = field(default_factory=time.time)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    slot: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    error: BaseException | None = None
    # Progress reported to the caller so far (outputs carry only what is new).
    num_reported_tokens: int = 0
    pending_logprobs: list[dict] = field(default_factory=list)  # sampled since the last output
    # Sampled on the device by a launched step, not yet appended to output_token_ids (0 or 1).
    num_placeholder_tokens: int = 0
    block_hashes: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0  # blocks of the current slot registered (or known unregistrable)
    num_cached_tokens: int | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt, output and placeholder tokens: the sequence length once in-flight samples land."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_placeholder_tokens

    @property
    def num_known_tokens(self) -> int:
        """Prompt and output tokens on the host (placeholders excluded)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def has_all_output_tokens(self) -> bool:
        """``max_tokens`` tokens are sampled (some maybe still in flight): nothing more to run."""
        return len(self.output_token_ids) + self.num_placeholder_tokens >= self.max_tokens

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output, placeholders as ``PLACEHOLDER_TOKEN_ID``, without
        concatenating the whole sequence."""
        num_prompt = len(self.prompt_token_ids)
        num_known = num_prompt + len(self.output_token_ids)
        tail = [PLACEHOLDER_TOKEN_ID] * (end - max(start, num_known)) if end > num_known else []
        end = min(end, num_known)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end] + tail
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt] + tail
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt] + tail

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not in the cache yet: what the next forwards must run."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int, logprob: dict | None) -> RequestStatus | None:
        """Append a sampled token (and its logprobs), advance the grammar and detokenize it. Returns the finished
        status it causes (EOS, a stop token or string, a completed grammar, ``max_tokens``), or None. The caller
        finishes the request."""
        if self.first_token_time is None:
            self.first_token_time = time.time()
        if self.grammar is not None:
            self.grammar.accept_token(token_id)
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.pending_logprobs.append(logprob)
        if token_id in self.params.stop_token_ids:
            self.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if token_id in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        stop_string = self.detokenizer.append(token_id)
        if stop_string is not None:
            self.stop_reason = stop_string
            return RequestStatus.FINISHED_STOPPED
        if self.grammar is not None and self.grammar.is_terminated:  # its stop token, even under ignore_eos
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason: "stop", "length", "abort", or None while running."""
        return self.status.value if self.is_finished else None
