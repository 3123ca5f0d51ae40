"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Validation is strict (a string is not a number), so a wrong type is a 400
rather than a silent conversion. These models check the shape of a body
only; what needs the model or the server's limits is checked by the service. Fields the server does not implement are
ignored, as OpenAI-compatible servers commonly do, except `n`, which must be 1.
`kv_press` and `kv_compression_ratio` are kvengine's own extra body fields.

The response models only document the responses in the OpenAPI schema (the
app builds responses as dicts, in openai_format); they allow extra fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by both endpoints."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=2**31 - 1)  # extra: 0 = off
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    kv_press: str | None = None  # a press spec from the registry, e.g. "snapkv" or "adakv:snapkv"
    kv_compression_ratio: float = Field(0.5, ge=0.0, lt=1.0)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """POST /v1/completions: a text prompt or a list of token ids."""

    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: a conversation rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


# ---- responses: declared in the OpenAPI document only; the app builds them as dicts ----


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Out):
    cached_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(_Out):
    index: int
    text: str
    finish_reason: str | None


class CompletionResponse(_Out):
    """The body of a non-streaming POST /v1/completions."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletionResponse(_Out):
    """The body of a non-streaming POST /v1/chat/completions."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Out):
    """OpenAI's error body, sent with every 4xx and 5xx."""

    error: ErrorDetail
