"""Tenants of the prefix cache: who a caller is (`tenant_salt`), and what all tenants share (`public_prefix_ids`).

Each API key is its own tenant: its cached prompts never speed up another
key's requests, so the time to first token says nothing about what other
tenants sent. The exception is a public prefix, a text the operator declares
shared (a system prompt everyone uses): its whole blocks are cached once for
all tenants, and what follows it stays per tenant. This module computes the
salt and the token ids; the engine (`Engine.add_public_prefix`) does the sharing.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from kvengine.config import ServerConfig
from kvengine.models import LoadedModel
from kvengine.server import openai_format as fmt
from kvengine.server.schemas import ChatMessage


def tenant_salt(config: ServerConfig, request: Request) -> str:
    """The prefix-cache salt of the caller ("" without API keys); 401 unless it sent a configured key."""
    if not config.api_keys:
        return ""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise fmt.APIError(401, "missing API key: send Authorization: Bearer KEY", "authentication_error")
    # compare_digest on every key: the time taken does not say which key was close.
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in config.api_keys):
        raise fmt.APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")
    return hashlib.sha256(b"kvengine-tenant:" + key.encode()).hexdigest()


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def public_prefix_ids(model: LoadedModel, text: str) -> list[list[int]]:
    """The token-id prefixes that `text` as a public prefix stands for, in each way a prompt can start.

    Two: the chat rendered with `text` as its system message, cut at the end
    of the system turn (what every /v1/chat/completions request with that
    system message starts with), and `text` encoded as a plain prompt (what a
    /v1/completions request starting with `text` starts with). The system turn
    rendered alone is cut to what it has in common with full conversations,
    since a template or tokenizer may render the turn's end differently once
    a user turn follows; two different user turns are tried so that no user
    text ends up in the shared part. Empty prefixes are left out.
    """
    tok = model.tokenizer
    assert tok is not None  # create_app refuses models without a tokenizer
    system = ChatMessage(role="system", content=text)
    chat = fmt.render_chat(model, [system], add_generation_prompt=False)
    for probe in ("a", "z"):
        full = fmt.render_chat(model, [system, ChatMessage(role="user", content=probe)])
        chat = chat[: _common_prefix_len(chat, full)]
    plain = list(tok.encode(text))
    return [ids for ids in (chat, plain) if ids]
