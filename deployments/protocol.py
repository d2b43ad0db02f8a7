"""OpenAI-compatible request models and the OpenAI error body.

Requests are validated by pydantic at the HTTP boundary; sampling ranges are checked by the engine's
``SamplingParams`` (one source of truth), whose ``InvalidRequestError(param=...)`` becomes a 400.
Unknown fields are accepted and ignored, as the OpenAI clients send fields we do not implement.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class OpenAIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status_code``."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = Field(default=False, description="Send a last chunk with token usage.")


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the output must follow."""

    name: str = Field(description="The schema's name (OpenAI requires one; not used otherwise).")
    description: str | None = Field(default=None, description="What the output is for (not used).")
    schema_: dict[str, Any] = Field(alias="schema", description="A JSON Schema object.")
    strict: bool | None = Field(default=None, description="Accepted; the schema is always enforced.")


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON valid under a schema."""

    type: Literal["text", "json_object", "json_schema"] = Field(description="text, json_object or json_schema.")
    json_schema: JsonSchemaFormat | None = Field(default=None, description="Required when type is json_schema.")

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object with a schema")
        return self


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="Served model id (see /v1/models).")
    temperature: float | None = Field(
        default=None, description="0 = greedy; default: the model's generation_config.json, else 1."
    )
    top_p: float | None = Field(
        default=None, description="Nucleus sampling mass in (0, 1]; default: the model's, else 1."
    )
    top_k: int | None = Field(
        default=None, description="Keep the k most likely tokens; -1 = off (extension); default: the model's, else off."
    )
    n: int = Field(default=1, description="Choices (independent samples) per prompt, 1 to 16.")
    stream: bool = Field(default=False, description="Stream chunks over server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    stop: str | list[str] | None = Field(default=None, description="Stop strings (not included in the output).")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    presence_penalty: float = Field(default=0.0, description="In [-2, 2].")
    frequency_penalty: float = Field(default=0.0, description="In [-2, 2].")
    ignore_eos: bool = Field(default=False, description="Keep generating past EOS (extension, benchmarks).")
    response_format: ResponseFormat | None = Field(default=None, description="Constrain the output to JSON.")
    user: str | None = Field(default=None, description="End-user id (ignored).")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"] = Field(description="Author of the message.")
    content: str | list[dict[str, Any]] | None = Field(default=None, description="Text, or a list of text parts.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise OpenAIError(f"unsupported content part type {part.get('type')!r}", param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(default=None, description="Most output tokens; default: up to the model length.")
    max_completion_tokens: int | None = Field(default=None, description="Alias of max_tokens (newer clients).")
    logprobs: bool = Field(default=False, description="Return the sampled tokens' logprobs.")
    top_logprobs: int | None = Field(default=None, description="Alternatives per token when logprobs is true.")


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] = Field(description="Text, token ids, or a list with one text.")
    max_tokens: int | None = Field(default=16, description="Most output tokens (OpenAI default 16).")
    logprobs: int | None = Field(default=None, description="Alternatives per token to return.")
    echo: bool = Field(default=False, description="Echo the prompt (not supported).")
    suffix: str | None = Field(default=None, description="Not supported.")
