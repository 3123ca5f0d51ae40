"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /version.

Shapes as vLLM's: /tokenize takes a `prompt` (encoded exactly as
/v1/completions encodes it) or `messages` (rendered exactly as
/v1/chat/completions renders them) and answers `count`, `max_model_len`,
`tokens` and, with `return_token_strs`, `token_strs`; /detokenize takes
`tokens` and answers `prompt`; /version answers kvengine's `version`. Both
POST routes need an API key when the server has keys, as the completion
routes do, and never touch the engine.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel

import kvengine
from kvengine.server import openai_format as fmt
from kvengine.server.openapi import error_responses
from kvengine.server.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from kvengine.server.service import Service

TOKEN_BODIES: dict[str, type[BaseModel]] = {"/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}


def add_token_routes(app: FastAPI, server: Service) -> None:
    """Add /tokenize, /detokenize and /version to `app`."""
    errors = error_responses(400, 401, 404, 408, 413)

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse}, **errors})
    async def tokenize(request: Request) -> dict[str, Any]:
        """Token ids of a prompt or a conversation, as the completion routes would run them."""
        server.tenant(request)
        body = await server.read_body(request, TokenizeRequest)
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise fmt.APIError(400, "send either `prompt` or `messages`", param="prompt")
        if body.messages is not None:
            ids = await server.render_chat(body.messages, body.add_generation_prompt)
        else:
            assert body.prompt is not None
            ids = await server.encode(body.prompt, "prompt", body.add_special_tokens)
        strs = None
        if body.return_token_strs:
            if not hasattr(server.tokenizer, "convert_ids_to_tokens"):
                raise fmt.APIError(
                    400, "this model's tokenizer has no token strings", param="return_token_strs"
                )
            strs = list(server.tokenizer.convert_ids_to_tokens(ids))
        return {
            "count": len(ids),
            "max_model_len": server.model.max_context_len,
            "tokens": ids,
            "token_strs": strs,
        }

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse}, **errors})
    async def detokenize(request: Request) -> dict[str, Any]:
        """The text of token ids, decoded as generated text is (special tokens skipped)."""
        server.tenant(request)
        body = await server.read_body(request, DetokenizeRequest)
        server.check_model(body.model)
        server.check_token_ids(body.tokens, "tokens")
        return {"prompt": await server.decode(body.tokens)}

    @app.get("/version")
    async def version() -> dict[str, str]:
        """kvengine's version."""
        return {"version": kvengine.__version__}
