"""Routing keys of HTTP requests: the tenant salt and hashes of fixed-size chunks of the prompt.

The router runs in front of the replicas, before any tokenizer, so it keys a
request by its prompt as sent: a completion's prompt text (or token ids), a
chat's messages (role and content, in order), cut into chunks of
`chunk_chars` characters (or `chunk_chars // 4` token ids, about as many
tokens) with the last chunk possibly partial. Two prompts share a key prefix
exactly where they share every chunk up to there, which is where the
replica's radix cache shares tokens too, up to a chunk. Each chunk's hash
covers only its contents: the position in the tree stands for the prefix.

The tenant is the same salt the server keys its prefix cache by
(`kvengine.server.tenancy.tenant_salt`), so keys of two API keys never meet.
This module is plain Python: no Ray, no model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kvengine.cluster.prefix_tree import RoutingKey

DEFAULT_CHUNK_CHARS = 64
_ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")


def _chunk_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def text_blocks(text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> tuple[int, ...]:
    """Hashes of `text` cut into `chunk_chars`-character chunks (the last may be shorter)."""
    return tuple(
        _chunk_hash(text[i : i + chunk_chars].encode("utf-8", "surrogatepass"))
        for i in range(0, len(text), chunk_chars)
    )


def id_blocks(ids: list[int], chunk_ids: int) -> tuple[int, ...]:
    """Hashes of a token-id prompt cut into chunks of `chunk_ids` ids."""
    return tuple(
        _chunk_hash(json.dumps(ids[i : i + chunk_ids]).encode()) for i in range(0, len(ids), chunk_ids)
    )


def _chat_text(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return None
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            return None
        content = m.get("content")
        text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
        parts.append(f"{m.get('role')}\x1f{m.get('name') or ''}\x1f{text}\x1e")
    return "".join(parts)


def prompt_blocks(path: str, body: bytes, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> tuple[int, ...]:
    """The block hashes of a request body's prompt; () for other routes or bodies that do not parse.

    A batched completion (a list of prompts) is keyed by its first prompt. A
    body the replica will refuse gets no key: it is routed by load alone.
    """
    if path not in _ROUTED_PATHS:
        return ()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ()
    if not isinstance(data, dict):
        return ()
    if path == "/v1/chat/completions":
        text = _chat_text(data.get("messages"))
        return text_blocks(text, chunk_chars) if text else ()
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: its first prompt
    if isinstance(prompt, str):
        return text_blocks(prompt, chunk_chars)
    if isinstance(prompt, list) and all(isinstance(x, int) for x in prompt):
        return id_blocks(prompt, max(1, chunk_chars // 4))
    return ()


def routing_key(tenant: str, path: str, body: bytes, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> RoutingKey:
    """The key a request is routed by: its tenant salt and its prompt's block hashes."""
    return RoutingKey(tenant, prompt_blocks(path, body, chunk_chars))
