"""A RAG prompt as token ids plus the spans of its reusable chunks, checked; built from documents.

`RagPrompt` is what the chunk cache works on: a prompt's token ids and the
half-open spans `[start, end)` of the documents in it. `check_spans` is the
one place that decides which spans are acceptable (used by the Python API and
by `parse_kv_chunks`, the parser of the HTTP field `kv_chunks`), so bad input
fails before anything is computed or cached. `build_rag_prompt` makes a
prompt from documents and a question: each document is tokenized on its own,
so its tokens are the same wherever it lands, and the chat template (if any)
wraps the whole.

Nothing here runs a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvengine.errors import InvalidRequestError

DOCUMENT_SEPARATOR = "\n\n"
_MARK = "\u0001kvengine-documents\u0001"


@dataclass(frozen=True)
class RagPrompt:
    """Token ids and the spans `[start, end)` of the reusable chunks in them, sorted and disjoint."""

    token_ids: list[int]
    spans: tuple[tuple[int, int], ...]

    def chunk(self, i: int) -> list[int]:
        start, end = self.spans[i]
        return self.token_ids[start:end]


def check_spans(
    spans: Sequence[Sequence[int]], prompt_len: int, max_context_len: int
) -> tuple[tuple[int, int], ...]:
    """The spans as sorted `(start, end)` pairs; InvalidRequestError naming the first bad one.

    A span must be two integers with `0 <= start < end <= prompt_len`; spans
    may not overlap; a chunk may not be longer than the model's context; at
    least one prompt token must follow the last chunk (the engine computes it
    to give the first output token).
    """
    pairs: list[tuple[int, int]] = []
    for i, span in enumerate(spans):
        if (
            isinstance(span, (str, bytes))
            or len(span) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in span)
        ):
            raise InvalidRequestError(
                f"kv_chunks[{i}] must be [start, end] token offsets, got {span!r}", param="kv_chunks"
            )
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= prompt_len:
            raise InvalidRequestError(
                f"kv_chunks[{i}] = [{start}, {end}] is not a span of the {prompt_len}-token prompt "
                "(need 0 <= start < end <= prompt length)",
                param="kv_chunks",
            )
        if end - start >= max_context_len:
            raise InvalidRequestError(
                f"kv_chunks[{i}] has {end - start} tokens; the model's context is {max_context_len}",
                param="kv_chunks",
            )
        pairs.append((start, end))
    pairs.sort()
    for (s0, e0), (s1, e1) in itertools.pairwise(pairs):
        if s1 < e0:
            raise InvalidRequestError(
                f"kv_chunks spans [{s0}, {e0}] and [{s1}, {e1}] overlap", param="kv_chunks"
            )
    if pairs and pairs[-1][1] >= prompt_len:
        raise InvalidRequestError(
            "the last kv_chunks span ends the prompt; at least one prompt token must follow the last chunk",
            param="kv_chunks",
        )
    return tuple(pairs)


def parse_kv_chunks(value: Any, prompt_len: int, max_context_len: int) -> tuple[tuple[int, int], ...]:
    """The HTTP field `kv_chunks` (a list of `[start, end]` token offsets into the prompt), checked."""
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(
            "kv_chunks must be a non-empty list of [start, end] token offsets", param="kv_chunks"
        )
    return check_spans(value, prompt_len, max_context_len)


def build_rag_prompt(
    tokenizer: Any,
    documents: Sequence[str],
    question: str,
    *,
    system: str | None = None,
    chat: bool = True,
) -> RagPrompt:
    """Documents, then the question, in one user turn; each document one chunk, tokenized alone.

    Documents are separated by `DOCUMENT_SEPARATOR` (outside the chunks). With
    `chat` and a chat template, the template's text before and after the
    user's content wraps the whole (with `system` as its system message).
    """
    if not documents:
        raise InvalidRequestError("a RAG prompt needs at least one document", param="documents")
    if any(not isinstance(d, str) or not d for d in documents):
        raise InvalidRequestError("documents must be non-empty strings", param="documents")
    head, tail = _template_around(tokenizer, system, chat)
    ids = _encode(tokenizer, head)
    spans = []
    for i, doc in enumerate(documents):
        if i:
            ids += _encode(tokenizer, DOCUMENT_SEPARATOR)
        doc_ids = _encode(tokenizer, doc)
        spans.append((len(ids), len(ids) + len(doc_ids)))
        ids += doc_ids
    ids += _encode(tokenizer, DOCUMENT_SEPARATOR + question + tail)
    return RagPrompt(ids, tuple(spans))


def _template_around(tokenizer: Any, system: str | None, chat: bool) -> tuple[str, str]:
    """The chat template's text before and after a user message's content ("", "" without one)."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return "", ""
    messages = [{"role": "user", "content": _MARK}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, _, tail = str(text).partition(_MARK)
    return head, tail


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []
