"""Log-probabilities and echo in OpenAI's shapes: which a body asks for, and the objects sent back.

Completions (OpenAI's legacy format, which lm-evaluation-harness reads):
`logprobs: k` (0..5) gives each token's `tokens`, `token_logprobs`,
`top_logprobs` (the k most likely, plus the token itself: up to k + 1) and
`text_offset` (where the token starts in the choice's text); `echo` puts the
prompt's decoded text before the choice's text and, with `logprobs`, the
prompt tokens' entries before the generated ones (the first has None).
`max_tokens: 0` with `echo` scores the prompt only. Chat: `logprobs: true`
with `top_logprobs: k` (0..20) gives `content`, one entry per token with its
`bytes` and its k best alternatives. Every number is the model's own, before
temperature, top-k and top-p (kvengine/engine/logprobs.py). Echo with
`stream` is not supported yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvengine.engine.generate import Detokenizer
from kvengine.engine.logprobs import Logprob
from kvengine.server import openai_format as fmt
from kvengine.server.schemas import ChatRequest, CompletionRequest


def logprob_params(body: CompletionRequest | ChatRequest) -> tuple[int | None, int | None]:
    """(logprobs, prompt_logprobs) for `SamplingParams`; 400 naming the field for a combination refused."""
    if isinstance(body, ChatRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise fmt.APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        return ((body.top_logprobs or 0) if body.logprobs else None), None
    if body.echo and body.stream:
        raise fmt.APIError(
            400, "echo: True is not supported yet with stream", param="echo", code="not_supported"
        )
    if body.max_tokens == 0 and not body.echo:
        raise fmt.APIError(400, "max_tokens: 0 scores the prompt only, which needs echo", param="max_tokens")
    scores_prompt = body.echo and (body.logprobs is not None or body.max_tokens == 0)
    return body.logprobs, (body.logprobs or 0) if scores_prompt else None


class ChoiceLogprobs:
    """The logprobs object of one choice's tokens, fed in order: text offsets continue across calls."""

    def __init__(self, tokenizer: Any, chat: bool, offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.offset = offset  # where the first token's text starts in the choice's text
        self.detokenizer = Detokenizer(tokenizer)
        self.num_sent = 0  # for `next`

    def format(self, ids: Sequence[int], entries: Sequence[Logprob | None]) -> dict[str, Any]:
        """The object for tokens `ids` with their entries (None: the prompt's first token)."""
        if self.chat:
            return {"content": [self._chat_entry(e) for e in entries if e is not None]}
        offsets = []
        for token_id in ids:
            offsets.append(self.offset + len(self.detokenizer.text))
            self.detokenizer.step([token_id])
        return {
            "tokens": [self._piece(t) for t in ids],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else self._top(e) for e in entries],
            "text_offset": offsets,
        }

    def next(self, ids: Sequence[int], entries: Sequence[Logprob]) -> dict[str, Any] | None:
        """The object for the tokens after those of the last call (streaming); None if none came."""
        start, self.num_sent = self.num_sent, len(entries)
        if start == self.num_sent:
            return None
        return self.format(ids[start : self.num_sent], entries[start:])

    def _piece(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def _top(self, entry: Logprob) -> dict[str, float]:
        top = {self._piece(t): lp for t, lp in entry.top}
        top.setdefault(self._piece(entry.token_id), entry.logprob)  # OpenAI: the token itself is always there
        return top

    def _chat_entry(self, entry: Logprob) -> dict[str, Any]:
        return {
            **self._chat_token(entry.token_id, entry.logprob),
            "top_logprobs": [self._chat_token(t, lp) for t, lp in entry.top],
        }

    def _chat_token(self, token_id: int, logprob: float) -> dict[str, Any]:
        piece = self._piece(token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}
