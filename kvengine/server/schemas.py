"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Validation is strict (a string is not a number), so a wrong type is a 400
rather than a silent conversion. These models check the shape of a body
only; what needs the model or the server's limits is checked by the service.

Nothing a client sends is ignored silently. A field no model here declares
is a 400 naming it. Fields OpenAI defines that this server does not
implement yet are declared, so that a client sending them at their "off"
value (many send defaults) is served; any other value is a 400 naming the
field (`NOT_SUPPORTED_YET`, checked by `unsupported_field`). Accepted and
honoured beyond OpenAI's own (log-probabilities and echo: see logprobs.py):
`top_k`, `ignore_eos`, `repetition_penalty`, `min_tokens` and
`stream_options.continuous_usage_stats` (vLLM's), `kv_press` and
`kv_compression_ratio`, and on completions `kv_chunks` / `kv_blend` (kvengine's;
kvengine/rag). Accepted as a no-op: `user` (an end-user
id that only OpenAI's abuse monitoring reads).

The response models only document the responses in the OpenAPI schema (the
app builds responses as dicts, in openai_format); they allow extra fields.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    # Fields this server does not implement yet, each with the values that mean "off".
    NOT_SUPPORTED_YET: ClassVar[dict[str, tuple[Any, ...]]] = {}


def unsupported_field(body: BaseModel) -> str | None:
    """The first field of `body` set to a value this server does not implement yet, else None."""
    for name, off in getattr(body, "NOT_SUPPORTED_YET", {}).items():
        if getattr(body, name) not in off:
            return name
    return None


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


class SemanticCacheOptions(_Body):
    """kvengine's opt-in to the semantic response cache (kvengine/server/semantic_cache.py)."""

    max_error: float = Field(gt=0.0, lt=1.0)  # at most this share of cached answers may be wrong
    allow_sampled: bool = False  # let a request with temperature > 0 use it too


class KVBlendOptions(_Body):
    """kvengine's: how the `kv_chunks` of a completion are reused (kvengine/rag/blend.py)."""

    mode: Literal["full", "reuse", "blend"] = "blend"
    recompute_ratio: float = Field(0.15, ge=0.0, le=1.0)  # blend: share of each moved chunk recomputed
    sink_tokens: int = Field(0, ge=0, le=2**20)  # reuse, blend: each moved chunk's first tokens recomputed
    anchor: Literal["none", "head"] = "none"  # "head": chunks computed after the prompt's text before them


class _Sampling(_Body):
    """Fields shared by both endpoints."""

    NOT_SUPPORTED_YET: ClassVar[dict[str, tuple[Any, ...]]] = {}

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=2**31 - 1)  # extra: 0 = off
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    ignore_eos: bool = False  # vLLM's extra: generate until max_tokens, whatever the EOS token says
    stream: bool = False
    stream_options: StreamOptions | None = None
    kv_press: str | None = None  # a press spec from the registry, e.g. "snapkv" or "adakv:snapkv"
    kv_compression_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    semantic_cache: SemanticCacheOptions | None = None  # kvengine's: reuse answers (kvengine/semantic)
    user: str | None = None  # accepted, unused
    n: int = Field(1, ge=1, le=128)  # choices per prompt, sampled from one prefill (they share its blocks)
    min_tokens: int = Field(0, ge=0)  # vLLM's extra: no EOS or stop string before this many tokens
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # OpenAI's, over the output tokens
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # OpenAI's, over the output tokens
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)  # vLLM's extra, over prompt and output
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a string) -> bias in [-100, 100]

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """POST /v1/completions: a prompt, or several (strings or token-id lists), one choice each."""

    NOT_SUPPORTED_YET: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Sampling.NOT_SUPPORTED_YET,
        "suffix": (None, ""),
    }

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default; 0 (with echo) scores the prompt only
    logprobs: int | None = Field(None, ge=0, le=5)  # OpenAI's cap for completions
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=128)  # sample this many, return the n most likely per token
    suffix: str | None = None
    kv_chunks: list[list[int]] | None = None  # kvengine's: [start, end) token offsets of reusable chunks
    kv_blend: KVBlendOptions | None = None  # kvengine's: how kv_chunks are reused (default: blend, 15%)

    def prompts(self) -> list[str | list[int]]:
        """The prompts in order: a string or token-id list is one, a list of them is several."""
        prompt = self.prompt
        if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # given to the chat template, which may render it
    tool_call_id: str | None = None  # of a "tool" message; given to the chat template

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(_Body):
    name: str = Field(max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None  # always strict here: every output matches the schema


class ResponseFormat(_Body):
    """OpenAI's `response_format`: text, any JSON object, or a JSON schema, enforced token by token."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: a conversation rendered with the model's chat template."""

    NOT_SUPPORTED_YET: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Sampling.NOT_SUPPORTED_YET,
        "tools": (None, []),
        "tool_choice": (None, "none"),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)  # needs logprobs: true
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's): a prompt as /v1/completions encodes it, or messages as chat renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # for `prompt`; a rendered chat carries its template's own
    add_generation_prompt: bool = True  # for `messages`
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's): token ids back to text."""

    model: str | None = None
    tokens: list[int]


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


class TokenizeResponse(_Out):
    """The body of POST /tokenize."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(_Out):
    """The body of POST /detokenize."""

    prompt: str


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Out):
    """OpenAI's error body, sent with every 4xx and 5xx."""

    error: ErrorDetail
