"""What the engine hands back: per-request deltas and engine-wide statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.prefix_summary import PrefixSummary


@dataclass
class RequestOutput:
    """One sequence's progress since its previous output (``new_*``) plus the cumulative state. A request with
    ``n`` > 1 has ``n`` sequences: each has its own outputs, told apart by ``index``, and its own final one.

    Attributes:
        request_id: the caller's id.
        index: which of the request's ``n`` samples this is (OpenAI's choice index; 0 when ``n`` is 1).
        prompt_token_ids: the prompt's tokens (set on every output; cheap, and handy for usage).
        new_token_ids: tokens generated since the previous output.
        new_text: text released since the previous output (complete characters, no stop string).
        text: all text released, on the final output only (empty before; streams read ``new_text``), like
            ``token_ids``.
        token_ids: all generated tokens (EOS / stop token included when it ended the request), on the final
            output only (empty before; streams read ``new_token_ids``): copying them every step costs O(length).
        finished: whether this is the sequence's last output.
        finish_reason: "stop" (EOS, stop token or stop string), "length", "abort", or None.
        stop_reason: the stop string or stop token id that ended it; None for EOS or other reasons.
        new_logprobs: one dict per new token, ``{"token_id", "logprob", "top": [(id, logprob), ...]}``,
            when the request asked for logprobs; else None.
        num_prompt_tokens, num_output_tokens: usage counts.
        num_cached_tokens: prompt tokens whose KV came from the prefix cache (OpenAI's
            ``prompt_tokens_details.cached_tokens``).
        arrival_time, first_token_time: ``time.time()`` stamps (first token: None until sampled).
        error: set when the request failed inside the engine (finish_reason "abort"); the async engine
            raises it to the request's consumer.
    """

    request_id: str
    prompt_token_ids: list[int] | None
    new_token_ids: list[int]
    new_text: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    arrival_time: float
    first_token_time: float | None
    new_logprobs: list[dict] | None = None
    error: BaseException | None = field(default=None, repr=False)
    index: int = 0
    num_cached_tokens: int = 0

    @classmethod
    def aborted_unstarted(
        cls, request_id: str, num_prompt_tokens: int, arrival_time: float, index: int = 0
    ) -> RequestOutput:
        """The final output of a sequence aborted before it reached the scheduler: nothing generated."""
        return cls(
            request_id=request_id,
            prompt_token_ids=None,  # the frontend holds the prompt
            new_token_ids=[],
            new_text="",
            text="",
            token_ids=[],
            finished=True,
            finish_reason="abort",
            stop_reason=None,
            num_prompt_tokens=num_prompt_tokens,
            num_output_tokens=0,
            arrival_time=arrival_time,
            first_token_time=None,
            index=index,
        )


@dataclass(frozen=True)
class EngineStats:
    """Engine load and KV page accounting, for the router (placement) and metrics.

    Attributes:
        num_total_pages / num_free_pages / num_mapped_pages / num_reclaimable_pages: physical page
            pool accounting (``free + mapped == total``; reclaimable pages are mapped but owned by no
            live token, so a new request can take them).
        tokens_per_page: tokens one page holds in one of the cache's virtual buffers (one layer's K or V in the
            layer-major layout, every layer's K and V in the token-major one); page_size_bytes: its size.
        pages_per_token_block: pages a request maps per ``tokens_per_page`` tokens: the cache's number of
            buffers (``2 * num_layers`` layer-major, 1 token-major).
        num_running / num_waiting: requests holding a slot / queued (new or preempted; from the engine core, also
            those whose grammars still compile).
        kv_usage: fraction of the pool holding live tokens, 0..1.
        num_preemptions: total since start.
        num_preempted_pages: pages that requests preempted after their first token, and waiting now, held and will
            take again (``Scheduler.num_preempted_pages``).
        num_free_slots / max_batch_size: cache batch slots free / in all.
        prefix_cache_queries / prefix_cache_hits: prompt tokens looked up in the prefix cache at admission /
            found there, since start (vLLM's counters).
        num_cached_blocks: blocks of computed tokens registered for reuse now.
        prefix_summary: the prefixes the cache holds, for the router's prefix affinity (None: prefix caching off).
    """

    num_total_pages: int
    num_free_pages: int
    num_mapped_pages: int
    num_reclaimable_pages: int
    tokens_per_page: float
    page_size_bytes: int
    pages_per_token_block: int
    num_running: int
    num_waiting: int
    kv_usage: float
    num_preemptions: int
    num_free_slots: int
    max_batch_size: int
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_cached_blocks: int = 0
    num_preempted_pages: int = 0
    prefix_summary: PrefixSummary | None = None

    @property
    def num_available_pages(self) -> int:
        """Pages a new request could get now: free or reclaimable."""
        return self.num_free_pages + self.num_reclaimable_pages

    def as_dict(self) -> dict:
        values = asdict(self)
        values["num_available_pages"] = self.num_available_pages
        return values
