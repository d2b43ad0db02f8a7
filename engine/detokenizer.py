"""Incremental detokenization with stop strings, safe for streaming."""

from __future__ import annotations

from collections.abc import Sequence

# Prompt tokens kept as decoding context: tokenizers whose decode depends on the previous token
# (SentencePiece drops the leading space of a sequence's first word) need a little left context.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of output token ids into a stream of text chunks.

    Guarantees, for streaming clients:
      * no chunk ends inside a multi-byte UTF-8 character: a token that decodes to an incomplete
        character (U+FFFD at the end) is held until the following tokens complete it; an output
        cut off mid-character (``max_tokens``) drops those trailing bytes;
      * the text never contains a stop string nor anything after it, and text that could still be
        the beginning of a stop string is held back until it can't (or the request finishes).

    Fast tokenizers decode through ``tokenizers``' own incremental ``DecodeStream`` (about 1 us a token; this runs
    for every request on every step). Others use the prefix/read offsets scheme: decode ``ids[prefix:]`` and
    subtract the decode of ``ids[prefix:read]``, so each step decodes a few tokens, not the whole output.
    """

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(ids=self._token_ids, skip_special_tokens=skip_special_tokens)
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._num_emitted_chars = 0
        self.output_text = ""
        """Decoded output so far (complete characters only), cut before a matched stop string."""
        self.stop_reason: str | None = None
        """The stop string that ended the output, if one did."""

    def append(self, token_id: int) -> str | None:
        """Add one output token's text; returns the stop string it completed, else ``None``.

        Tokens that end the request by id (EOS, ``stop_token_ids``) should not be appended: their
        text is not part of the output.
        """
        if self.stop_reason is not None:
            raise RuntimeError("append() after a stop string already ended the output")
        new_text = self._stream.step(self._backend, token_id) if self._stream is not None else self._step(token_id)
        if not new_text:
            return None

        # A stop string may straddle the old text and the new text.
        search_start = max(0, len(self.output_text) - self._max_stop_len + 1)
        self.output_text += new_text
        match_index, match = -1, None
        for stop in self._stop:
            index = self.output_text.find(stop, search_start)
            if index != -1 and (match is None or index < match_index):
                match_index, match = index, stop
        if match is not None:
            self.output_text = self.output_text[:match_index]
            self.stop_reason = match
        return match

    def take_new_text(self, finished: bool = False) -> str:
        """Text that is safe to send since the last call; ``finished`` releases held-back text."""
        end = len(self.output_text)
        if not finished and self.stop_reason is None:
            end -= self._stop_prefix_len()
        new_text = self.output_text[self._num_emitted_chars : end]
        self._num_emitted_chars = max(self._num_emitted_chars, end)
        return new_text

    @property
    def emitted_text(self) -> str:
        """Everything handed out by :meth:`take_new_text` so far."""
        return self.output_text[: self._num_emitted_chars]

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        for length in range(min(self._max_stop_len - 1, len(self.output_text)), 0, -1):
            tail = self.output_text[-length:]
            if any(stop.startswith(tail) for stop in self._stop):
                return length
        return 0

    def _step(self, token_id: int) -> str | None:
        """The prefix/read offsets step for tokenizers without a ``tokenizers`` backend."""
        self._token_ids.append(token_id)
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            # Nothing new, or an incomplete UTF-8 sequence: wait for the next token.
            return None
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return full_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(
            token_ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )
