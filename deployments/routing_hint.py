"""What the page-aware router needs to know about a request before it is placed."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RoutingHint:
    """First positional argument of every call to the engine deployment.

    The ingress tokenizes the prompt, so the router can estimate the request's KV footprint without
    touching the payload.

    Attributes:
        num_prompt_tokens: tokens in the (chat-templated) prompt.
        max_tokens: most output tokens each of its sequences may generate (already capped by the model length).
        num_sequences: sequences the request runs (OpenAI's ``n``), each with its own copy of the prompt's KV.
        prefix_probe: ``(num_tokens, key)`` of a few of the prompt's blocks (``engine.prefix_summary.prefix_probe``):
            matched against each replica's prefix summary, they tell how much of the prompt a replica holds. Empty
            when the engine does not cache prefixes.
    """

    num_prompt_tokens: int
    max_tokens: int
    num_sequences: int = 1
    prefix_probe: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            raise ValueError(f"num_prompt_tokens must be >= 0, got {self.num_prompt_tokens}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.num_sequences < 1:
            raise ValueError(f"num_sequences must be >= 1, got {self.num_sequences}")

    @property
    def num_tokens(self) -> int:
        """Largest KV footprint of one of the request's sequences in tokens (prompt + every output token)."""
        return self.num_prompt_tokens + self.max_tokens

    def pages(self, tokens_per_page: float, pages_per_token_block: int, cached_tokens: int = 0) -> int:
        """Largest KV footprint of the whole request in physical pages, every sequence at its longest, less the
        pages of the first ``cached_tokens`` prompt tokens (whole blocks a replica already holds: each sequence
        maps those pages instead of new ones)."""
        cached = min(cached_tokens, self.num_prompt_tokens)
        per_sequence = pages_for_tokens(self.num_tokens, tokens_per_page, pages_per_token_block) - pages_for_tokens(
            cached, tokens_per_page, pages_per_token_block
        )
        return self.num_sequences * per_sequence


def pages_for_tokens(num_tokens: int, tokens_per_page: float, pages_per_token_block: int) -> int:
    """Physical pages a sequence of ``num_tokens`` occupies in a vAttention cache.

    The cache maps one page per ``tokens_per_page`` tokens in each of its virtual buffers, so a block of
    ``tokens_per_page`` tokens costs ``pages_per_token_block`` pages: the number of buffers, ``2 * num_layers``
    in the layer-major layout (a buffer per layer's K and V), 1 in the token-major one (every layer's K and V of
    a token side by side).
    """
    if num_tokens <= 0 or tokens_per_page <= 0:
        return 0
    return math.ceil(num_tokens / tokens_per_page) * pages_per_token_block
