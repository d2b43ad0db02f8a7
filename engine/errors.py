"""Engine exceptions.

Errors are part of the interface: the HTTP layer maps ``InvalidRequestError`` (and its subclass
``PromptTooLongError``) to an OpenAI-style 400 body naming ``param``, and ``EngineDeadError`` to a 5xx.
A request's mistake never kills the engine.
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base class for failures inside the engine (not caused by a request's parameters)."""


class InvalidRequestError(ValueError):
    """A request is malformed: bad sampling parameter, empty prompt, unknown id, ...

    Attributes:
        message: human-readable explanation.
        param: the offending request field (e.g. ``"temperature"``), or ``None``.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):
        # Keep ``param`` across pickling (Ray ships exceptions between processes).
        return (type(self), (self.message, self.param))


class PromptTooLongError(InvalidRequestError):
    """The request can never fit: prompt (+ max_tokens) beyond ``max_seq_len``, or it needs more KV
    pages than the whole physical pool holds."""

    def __init__(self, message: str, param: str | None = "prompt") -> None:
        super().__init__(message, param)


class EngineDeadError(EngineError):
    """The engine's step loop died; every pending and future request fails with this."""
