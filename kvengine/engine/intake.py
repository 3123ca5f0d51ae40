"""Intake: a new request or context checked against the model and the cache, and made a `Sequence`.

Every check that needs only the request, the model and the block size is
here, so that a request the engine accepts never fails later for one of these
reasons (a press in particular never refuses it inside a forward pass shared
with other requests). What needs the pool (does the worst case fit) or other
sequences (is the parent a ready context) stays with the engine. Sequence ids
are given here, in order, to accepted requests only.
"""

from __future__ import annotations

import itertools

from kvengine.engine.request import SamplingParams, Sequence, check_decode_budget
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press.base import Press, ScorePress


class Intake:
    """Checks new requests and contexts for one model and block size, and makes their sequences."""

    def __init__(self, model: LoadedModel, block_size: int) -> None:
        self.vocab_size: int = model.config.vocab_size
        self.max_context_len = model.max_context_len
        self.num_layers = model.num_layers
        self.block_size = block_size
        self._ids = itertools.count()

    def check_prompt(self, token_ids: list[int]) -> None:
        """Raise InvalidRequestError for no tokens or a token id outside the vocabulary."""
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")

    def request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        press: Press | None = None,
        context_len: int | None = None,
        parent: Sequence | None = None,
        decode_press: Press | None = None,
        decode_budget: int | None = None,
        cache_salt: str = "",
    ) -> Sequence:
        """The sequence of a request (the arguments of `Engine.add_request`), or InvalidRequestError."""
        self.check_prompt(prompt_ids)
        full = (parent.prompt_ids if parent else []) + list(prompt_ids)
        if len(full) >= self.max_context_len:
            raise InvalidRequestError(
                f"the prompt has {len(full)} tokens; the model's context is "
                f"{self.max_context_len} tokens, which must hold the prompt and at least one new token"
            )
        if context_len is not None and not 0 < context_len <= len(prompt_ids):
            raise InvalidRequestError(f"context_len must be in [1, {len(prompt_ids)}], got {context_len}")
        if parent is not None and params.prompt_logprobs is not None:
            raise InvalidRequestError(
                "prompt_logprobs need the whole prompt computed, not a context's continuation"
            )
        if not isinstance(cache_salt, str):
            raise InvalidRequestError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        context_len = context_len if context_len is not None else len(prompt_ids)
        if press is not None:
            press.validate(context_len, self.num_layers)
        self._check_decode(press, decode_press, decode_budget)
        return Sequence(
            next(self._ids),
            full,
            params,
            press=press,
            context_len=context_len,
            parent=parent,
            decode_press=decode_press,
            decode_budget=decode_budget or 0,
            cache_salt=cache_salt,
        )

    def _check_decode(
        self, press: Press | None, decode_press: Press | None, decode_budget: int | None
    ) -> None:
        if (decode_press is None) != (decode_budget is None):
            raise InvalidRequestError("decode_press and decode_budget go together")
        if decode_press is not None and decode_budget is not None:
            check_decode_budget(decode_press, decode_budget, self.block_size)
            if press is not None and not isinstance(press, ScorePress):
                raise InvalidRequestError("decoding-time compression needs the same budget in every head")

    def context(self, context_ids: list[int], press: Press | None, keep_queries: bool) -> Sequence:
        """The sequence of a context (the arguments of `Engine.add_context`), or InvalidRequestError."""
        self.check_prompt(context_ids)
        if len(context_ids) >= self.max_context_len:
            raise InvalidRequestError(
                f"the context has {len(context_ids)} tokens; the model's context is {self.max_context_len}"
            )
        if press is not None and keep_queries:
            raise InvalidRequestError("keep_queries is for contexts compressed later, not with a press now")
        if press is not None:
            press.validate(len(context_ids), self.num_layers)
        return Sequence(
            next(self._ids),
            list(context_ids),
            SamplingParams(max_tokens=1),
            press=press,
            context_len=len(context_ids),
            is_context=True,
            keep_queries=keep_queries,
        )

    def compressed_copy(self, parent: Sequence, press: Press) -> Sequence:
        """A new context with the tokens of the context `parent`, to be compressed by `press`."""
        press.validate(parent.context_len, self.num_layers)
        return Sequence(
            next(self._ids),
            parent.prompt_ids,
            parent.params,
            press=press,
            context_len=parent.context_len,
            is_context=True,
        )
