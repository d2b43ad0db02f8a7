"""Per-request sampling parameters (OpenAI-compatible semantics)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

from engine.errors import InvalidRequestError

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20
# Samples per prompt: each holds its own cache slot and pages, as a request of its own would.
MAX_N = 16
# Stop strings are searched after every token: bound their number and length (OpenAI allows 4).
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 512
# Temperatures below this sample as greedy: dividing float32 logits by them overflows to inf/NaN.
GREEDY_TEMPERATURE_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Attributes:
        max_tokens: most output tokens to generate; ``None`` = up to the cache's ``max_seq_len``.
        temperature: 0 (or below GREEDY_TEMPERATURE_EPS) = greedy; otherwise logits are divided by it. In [0, 2].
        top_p: nucleus sampling mass in (0, 1]; 1 = off.
        top_k: keep the k most likely tokens; -1 = off.
        seed: seeds a per-request ``torch.Generator`` so the sample is reproducible whatever else
            runs in the batch; ``None`` = engine-wide randomness.
        stop: strings that end generation; the matched string is not part of the output text.
        stop_token_ids: token ids that end generation (their text is not emitted).
        ignore_eos: keep generating past the model's EOS tokens (benchmarks).
        logprobs: ``None`` = off; k in [0, 20] = the sampled token's logprob plus the k most likely
            alternatives.
        presence_penalty: subtracted once from the logit of every token already generated, in [-2, 2].
        frequency_penalty: subtracted per occurrence from the logit of generated tokens, in [-2, 2].
        n: independent samples of the prompt, in [1, 16]; each is its own sequence (slot, pages), its outputs
            tagged with its ``index``. With ``seed`` set, sample i draws from ``seed + i``.
        json_schema: constrains the output to JSON valid under this JSON Schema (``{"type": "object"}``: any JSON
            object); the request stops once the JSON is complete. ``None`` = free text.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    json_schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # OpenAI accepts a single string for ``stop`` and null for the lists.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_output_on_host(self) -> bool:
        """Sampling the next token reads every output token so far (penalties count them, a grammar is advanced
        by them), so the previous step's token must be on the host first."""
        return self.has_penalties or self.json_schema is not None

    def validate(self) -> None:
        """Raise ``InvalidRequestError(param=<field>)`` for the first out-of-range field."""

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise InvalidRequestError(f"max_tokens must be None or an int >= 1, got {self.max_tokens!r}", "max_tokens")
        if not is_num(self.temperature) or not (0.0 <= self.temperature <= 2.0):
            raise InvalidRequestError(f"temperature must be in [0, 2], got {self.temperature!r}", "temperature")
        if not is_num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            raise InvalidRequestError(f"top_k must be -1 (off) or an int >= 1, got {self.top_k!r}", "top_k")
        if self.seed is not None and (not is_int(self.seed) or not (0 <= self.seed < 2**63)):
            raise InvalidRequestError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}", "seed")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError(
                f"stop must be a string or a list of non-empty strings, got {self.stop!r}", "stop"
            )
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequestError(
                f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(self.stop)}", "stop"
            )
        if any(len(s) > MAX_STOP_SEQUENCE_CHARS for s in self.stop):
            raise InvalidRequestError(f"stop sequences must be at most {MAX_STOP_SEQUENCE_CHARS} characters", "stop")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids must be a list of ints >= 0, got {self.stop_token_ids!r}", "stop_token_ids"
            )
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be a bool, got {self.ignore_eos!r}", "ignore_eos")
        if self.logprobs is not None and (not is_int(self.logprobs) or not (0 <= self.logprobs <= MAX_LOGPROBS)):
            raise InvalidRequestError(
                f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}", "logprobs"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_num(value) or not (-2.0 <= value <= 2.0):
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value!r}", name)
        if not is_int(self.n) or not (1 <= self.n <= MAX_N):
            raise InvalidRequestError(f"n must be an int in [1, {MAX_N}], got {self.n!r}", "n")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise InvalidRequestError(
                f"json_schema must be None or a JSON Schema object (dict), got {type(self.json_schema).__name__}",
                "json_schema",
            )


# generation_config.json key -> the SamplingParams field it gives a default to (as vLLM's ``--generation-config
# auto``); keys the engine cannot honour are named in a warning.
GENERATION_CONFIG_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_new_tokens": "max_tokens",
}
_UNSUPPORTED_GENERATION_KEYS = ("repetition_penalty", "min_p", "typical_p", "no_repeat_ngram_size")


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for the sampling fields it leaves unset: the model's recommended values from its
    ``generation_config.json``, each ``None`` where the model names none and :class:`SamplingParams`' own default
    applies.

    Attributes:
        temperature, top_p, top_k: as :class:`SamplingParams` (``top_k`` 0, "off" in a generation config, is -1).
        max_tokens: from ``max_new_tokens``.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None

    @classmethod
    def from_generation_config(
        cls, generation_config: dict[str, Any], source: str = "generation_config.json"
    ) -> SamplingDefaults:
        """The defaults a parsed ``generation_config.json`` names. A value out of :class:`SamplingParams`' range is
        left out with a warning (requests then get the engine's default) rather than failing every request."""
        values = {}
        for key, name in GENERATION_CONFIG_DEFAULTS.items():
            value = generation_config.get(key)
            if value is None:
                continue
            if name == "top_k" and value == 0:
                value = -1
            try:
                SamplingParams(**{name: value})
            except InvalidRequestError as exc:
                logger.warning("%s: ignoring %s=%r: %s", source, key, value, exc.message)
                continue
            values[name] = value
        ignored = [k for k in _UNSUPPORTED_GENERATION_KEYS if generation_config.get(k) not in (None, 0, 1)]
        if ignored:
            logger.warning("%s: %s not supported by this engine; ignored", source, ", ".join(ignored))
        return cls(**values)

    def params(self, **values: Any) -> SamplingParams:
        """``SamplingParams(**values)``, where each of these defaults' fields that ``values`` leaves out or gives as
        ``None`` (unset) takes the model's default, or SamplingParams' own where the model has none.

        Raises:
            InvalidRequestError: an out-of-range field.
        """
        merged = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        defaulted = {f.name for f in fields(self)}
        merged.update({k: v for k, v in values.items() if v is not None or k not in defaulted})
        return SamplingParams(**merged)
