"""Requests as explicit data: sampling parameters, status and per-sequence state.

A `Sequence` is data that the engine's modules change, each its own fields:
`Intake` (intake.py) what it is made with; the scheduler its lifecycle
(status, cache, computed tokens, compression, preemptions, finish); the engine
what a step gives it (output tokens, first-token time, queries). The prefix
cache never sees a sequence, only its `prefix_key`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kvengine.cache.paged import SequenceKV
from kvengine.cache.prefix_key import PrefixKey
from kvengine.engine.constraints import Grammar, GrammarMatcher
from kvengine.engine.logprobs import MAX_LOGPROBS, Logprob, token_logprobs
from kvengine.errors import InvalidRequestError
from kvengine.press.base import Press, with_budget


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. `temperature == 0` means greedy.

    `top_k == 0` and `top_p == 1.0` switch those filters off. Penalties apply
    first, greedy or not (sampler.py): `presence_penalty` and
    `frequency_penalty` as OpenAI defines them, over the generated tokens;
    `repetition_penalty` as transformers and vLLM define it, over prompt and
    generated tokens (1.0 is off); then `logit_bias` is added. `seed` makes a
    sampled sequence reproducible on its own, whatever else shares its batch.
    `min_tokens` holds EOS back until that many tokens are out; `grammar`
    (a JSON schema) masks every token that would not match it (constraints.py).
    `logprobs=k` records each generated token's log-probability and the k
    most likely tokens at its position; `prompt_logprobs=k` does the same for
    every prompt token after the first, and allows `max_tokens=0` (score the
    prompt only). Both are the model's own, before temperature, top-k and
    top-p (logprobs.py); None records none, k is at most `MAX_LOGPROBS`.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: minus this from tokens generated at least once
    frequency_penalty: float = 0.0  # OpenAI's: minus this times each token's count in the output
    repetition_penalty: float = 1.0  # transformers' / vLLM's: over prompt and output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, bias in [-100, 100]) added
    min_tokens: int = 0  # vLLM's: no EOS (and no stop string, in generate.py) before this many outputs
    grammar: Grammar | None = None  # every output matches it (constraints.py)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidRequestError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        least = 0 if self.prompt_logprobs is not None else 1  # 0: score the prompt, generate nothing
        if self.max_tokens < least:
            raise InvalidRequestError(f"max_tokens must be >= {least}, got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (
                isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS
            ):
                raise InvalidRequestError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {k!r}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:  # also rejects NaN
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {bias} for {token}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise InvalidRequestError(
                f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}"
            )
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int):
            raise InvalidRequestError(f"min_tokens must be an integer, got {self.min_tokens!r}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if self.min_tokens and self.grammar is not None:
            raise InvalidRequestError("min_tokens cannot be combined with a grammar (response_format)")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
        )


def check_decode_budget(press: Press, budget: int, block_size: int) -> None:
    """Raise InvalidRequestError if `press` cannot keep `budget` tokens per head."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise InvalidRequestError(f"decode_budget must be a positive integer, got {budget!r}")
    reserved = press.reserved_tokens
    if budget <= reserved:
        raise InvalidRequestError(
            f"decode_budget={budget} leaves no room besides the press's {reserved} sink/window tokens"
        )
    with_budget(press, budget + block_size + 1, budget)  # raises for presses without a ratio


DECODE_QUERY_WINDOW = 64  # recent queries kept per layer for decoding-time presses


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and cache as it moves through the engine."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "abort"
    kv: SequenceKV | None = None
    num_computed: int = 0  # tokens whose keys and values are cached (next RoPE position)
    kv_bytes: int = 0  # bytes its blocks held when it finished
    press: Press | None = None  # compresses the first `context_len` prompt tokens once cached
    context_len: int = 0
    compressed: bool = False
    parent: Sequence | None = None  # a compressed context this sequence continues (a fork)
    is_context: bool = False  # only prefilled (and compressed), for children to continue
    keep_queries: bool = False  # keep each layer's prompt queries, to compress copies later
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (H_q, T, D)
    # Decoding-time compression: keep each head at `decode_budget` tokens while generating.
    decode_press: Press | None = None
    decode_budget: int = 0
    generator: torch.Generator | None = None
    matcher: GrammarMatcher | None = None  # where its output stands in `params.grammar`
    # Prefix cache: the tenant's salt (part of the key), tokens reused at the last admission.
    cache_salt: str = ""
    num_cached_tokens: int = 0
    num_skipped: int = 0  # admissions that went to a later request with a longer cached prefix
    num_preemptions: int = 0  # times its blocks were freed to be recomputed later
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    output_logprobs: list[Logprob] = field(default_factory=list)  # with params.logprobs
    prompt_logprobs: list[Logprob | None] = field(default_factory=list)  # with params.prompt_logprobs

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and not self.prompt_logprobs:
            self.prompt_logprobs = [None] * len(self.prompt_ids)  # the first token never gets one

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefilling(self) -> bool:
        """True until every prompt token has its keys and values cached."""
        return self.num_computed < len(self.prompt_ids)

    @property
    def is_plain(self) -> bool:
        """No press, no shared context: its cache is exactly its tokens' keys and values.

        Only plain sequences share prefixes through the prefix cache and are
        preempted (recomputing them gives the same cache).
        """
        return (
            self.press is None
            and self.decode_press is None
            and self.parent is None
            and not self.is_context
            and not self.keep_queries
        )

    @property
    def reuses_compressed(self) -> bool:
        """True for a request whose compressed context can be kept and reused by later ones."""
        return self.press is not None and self.parent is None and not self.keep_queries

    def prefix_key(self) -> PrefixKey | None:
        """What the prefix cache may give this sequence at admission; None if it takes no part.

        Plain: every token but the last (its logits are always computed
        again). With a press whose context can be kept: the context and press.
        None with `prompt_logprobs`: the logits of every prompt position are
        needed, so none is taken from the cache (its own blocks are still left there).
        """
        if self.params.prompt_logprobs is not None:
            return None
        if self.is_plain:
            return PrefixKey(self.token_ids[:-1], self.cache_salt)
        if self.reuses_compressed:
            return PrefixKey(self.prompt_ids[: self.context_len], self.cache_salt, repr(self.press))
        return None

    def computed_key(self) -> PrefixKey:
        """The tokens whose keys and values are cached, as the prefix cache keys them (plain only)."""
        return PrefixKey(self.token_ids[: self.num_computed], self.cache_salt)

    def store_queries(self, queries: dict[int, torch.Tensor]) -> None:
        """Store one step's queries per layer: all of a kept context's, the last few for a decode press."""
        for layer, q in queries.items():
            if self.decode_press is None:
                self.queries[layer] = q
                continue
            old = self.queries.get(layer)
            both = q if old is None else torch.cat([old, q], dim=1)
            self.queries[layer] = both[:, -DECODE_QUERY_WINDOW:]

    def add_prompt_logprobs(self, start: int, logits: torch.Tensor) -> None:
        """Score the prompt tokens that `logits` `(n, V)` of positions `start`.. predict (each the next one).

        Idempotent: a prompt computed again after a preemption gives the same entries.
        """
        k = self.params.prompt_logprobs
        end = min(start + logits.shape[0], len(self.prompt_ids) - 1)  # the last position predicts an output
        if k is None or end <= start:
            return
        targets = self.prompt_ids[start + 1 : end + 1]
        self.prompt_logprobs[start + 1 : end + 1] = token_logprobs(logits[: end - start], targets, k)

    @property
    def awaits_compression(self) -> bool:
        """True until the context is cached and compressed (it is prefilled in one piece)."""
        return (self.press is not None or self.keep_queries) and not self.compressed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(frozen=True)
class TokenEvent:
    """A token produced for a request in one step.

    `token_id` is None only for a request that ends after its prompt
    (`max_tokens=0`). `logprob` is set with `SamplingParams.logprobs`;
    `prompt_logprobs` (one per prompt token, None for the first) comes with a
    request's first event when it asked for them.
    """

    seq_id: int
    token_id: int | None
    finished: bool
    finish_reason: str | None
    logprob: Logprob | None = None
    prompt_logprobs: list[Logprob | None] | None = None


@dataclass(frozen=True)
class RequestOutput:
    """A finished request as `Engine.generate` returns it."""

    seq_id: int
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    num_cached_tokens: int  # prompt tokens reused from the prefix cache at the last admission
    num_preemptions: int
    ttft_s: float  # time to first token, from `add_request`
    logprobs: list[Logprob] | None = None  # one per output token, with `SamplingParams.logprobs`
    prompt_logprobs: list[Logprob | None] | None = None  # with `SamplingParams.prompt_logprobs`

    @classmethod
    def of(cls, seq: Sequence) -> RequestOutput:
        first = seq.first_token_time or seq.finish_time or seq.arrival_time
        return cls(
            seq.seq_id,
            list(seq.prompt_ids),
            list(seq.output_ids),
            seq.finish_reason or "abort",
            seq.num_cached_tokens,
            seq.num_preemptions,
            first - seq.arrival_time,
            list(seq.output_logprobs) if seq.params.logprobs is not None else None,
            list(seq.prompt_logprobs) if seq.params.prompt_logprobs is not None else None,
        )
