"""Structured output: JSON held to a JSON Schema by a grammar (xgrammar), applied as a token mask when sampling.

A request's schema is compiled once against the model's vocabulary (the compiler also caches compiled schemas);
each of its sequences gets its own ``Grammar``, which the request advances by every output token it appends and
which tells the sampler the tokens allowed next. The grammar's stop tokens are the model's EOS tokens: they are
allowed only once the JSON is complete, and accepting one terminates the grammar.

xgrammar is imported on first use: an engine that never sees a schema runs without it.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from engine.errors import InvalidRequestError

# Whitespace between JSON tokens: the format is the model's (pretty-printed or compact), but a run of it is bounded,
# so that a small model cannot spend its whole budget on newlines.
MAX_WHITESPACE_CHARS = 16


class Grammar:
    """One sequence's position in its grammar (an xgrammar matcher)."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept_token(self, token_id: int) -> None:
        """Advance by one output token; ``ValueError`` if the grammar does not allow it (the mask should have)."""
        if not self.matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} is not allowed by the request's JSON grammar")

    @property
    def is_terminated(self) -> bool:
        """The JSON is complete and a stop token was accepted: the sequence is done."""
        return self.matcher.is_terminated()


class GrammarCompiler:
    """Compiles JSON Schemas into grammars over one model's vocabulary.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        vocab_size: the width of the model's logits (may differ from the tokenizer's vocabulary).
        stop_token_ids: the model's EOS ids: the grammar's stop tokens.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: frozenset[int]) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self._compiler = xgr.GrammarCompiler(info)

    def grammars(self, json_schema: dict[str, Any], count: int) -> list[Grammar]:
        """``count`` fresh grammars of the JSON valid under ``json_schema``, one per sequence.

        Raises:
            InvalidRequestError: the schema is not valid JSON Schema, or uses what the grammar cannot express.
        """
        import json

        import xgrammar as xgr

        try:
            compiled = self._compiler.compile_json_schema(
                json.dumps(json_schema), any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE_CHARS
            )
        except Exception as exc:  # noqa: BLE001 - whatever the compiler rejects is the schema's fault
            raise InvalidRequestError(f"invalid JSON schema: {_compiler_message(exc)}", "json_schema") from None
        return [Grammar(xgr.GrammarMatcher(compiled)) for _ in range(count)]


class GrammarMask:
    """Masks, in a batch of logits, the tokens that each row's grammar does not allow next."""

    def __init__(self) -> None:
        self._batch_matcher = None  # made on first use (xgrammar's thread pool)

    def apply(self, logits: torch.Tensor, grammars: list[Grammar | None]) -> None:
        """Set to -inf, in place, every logit whose token the row's grammar does not allow.

        Args:
            logits: [N, vocab] float logits.
            grammars: [N] each row's grammar, None for rows left free.
        """
        import xgrammar as xgr

        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return
        if self._batch_matcher is None:
            self._batch_matcher = xgr.BatchGrammarMatcher()
        num_rows, vocab_size = logits.shape
        pin = logits.device.type == "cuda"
        # Filled on the host while the device runs the forward, then copied without waiting for it.
        bitmask = torch.full(xgr.get_bitmask_shape(num_rows, vocab_size), -1, dtype=torch.int32, pin_memory=pin)
        self._batch_matcher.batch_fill_next_token_bitmask([grammars[i].matcher for i in rows], bitmask, indices=rows)
        bitmask = bitmask.to(logits.device, non_blocking=pin)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, indices=rows)


def _compiler_message(exc: Exception) -> str:
    """The compiler's message without its C++ source location (``[12:00:00] /path/file.cc:42: ...``)."""
    message = str(exc).strip()
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", message) or type(exc).__name__
