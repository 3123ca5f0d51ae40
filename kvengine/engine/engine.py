"""The engine: requests in, tokens out, one forward pass per `step()`.

The engine works on token ids only; it knows nothing about text, chat
templates or stop strings (see `generate.py`). It owns the block pool, the
scheduler, the prefix cache (when `CacheConfig.prefix_cache` is on) and the
model runner, and guarantees that a finished or aborted request's blocks are
back in the pool, or kept by the prefix cache, when `step()` or `abort()`
returns. `generate` runs a batch to the end; `AsyncEngine` (async_engine.py)
streams tokens per request.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from kvengine.cache.paged import KVPool, PagedKVCache
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.compressed import reuses_compressed
from kvengine.engine.memory import engine_stats, make_pool, make_prefix_cache
from kvengine.engine.prefix import PrefixCache, check_ownership
from kvengine.engine.request import RequestOutput, SamplingParams, Sequence, Status, check_decode_budget
from kvengine.engine.runner import ModelRunner, StepInput
from kvengine.engine.sampler import sample
from kvengine.engine.scheduler import Scheduler
from kvengine.errors import InvalidRequestError, KVEngineError
from kvengine.models import LoadedModel
from kvengine.press.base import Press, ScorePress, with_budget


@dataclass(frozen=True)
class TokenEvent:
    """A token produced for a request in one step."""

    seq_id: int
    token_id: int
    finished: bool
    finish_reason: str | None


DECODE_QUERY_WINDOW = 64  # recent queries kept per layer for decoding-time presses


class Engine:
    """Continuous generation over a paged KV cache for one model."""

    def __init__(
        self,
        model: LoadedModel,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
    ) -> None:
        self.model = model
        self.cache_config = cache_config or CacheConfig()
        scheduler_config = scheduler_config or SchedulerConfig()
        pool = make_pool(self.cache_config, scheduler_config, model)
        self.cache = PagedKVCache(pool, model.num_layers, model.num_kv_heads)
        self.runner = ModelRunner(model, self.cache)
        self.prefix: PrefixCache | None = None
        if self.cache_config.prefix_cache:
            self.prefix = make_prefix_cache(self.cache_config, self.cache, model.name)
        self.scheduler = Scheduler(scheduler_config, self.cache, model.max_context_len, self.prefix)
        self.sequences: dict[int, Sequence] = {}
        self.peak_bytes_in_use = 0
        self.num_decode_compressions = 0
        self.num_prompt_tokens = 0  # prompt tokens of queued requests, cached ones included
        self.num_prefill_tokens = 0  # prompt tokens computed by forward passes
        self.num_compressions = 0  # contexts a press compressed (kept contexts reused are not counted)
        self.num_compressed_bytes_saved = 0  # uncompressed minus held bytes, summed over compressions
        self.step_errors: dict[int, KVEngineError] = {}  # requests the last step ended with an error
        self.last_step_size = 0  # sequences in the last step's forward pass
        self._ids = itertools.count()

    @property
    def pool(self) -> KVPool:
        return self.cache.pool

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        *,
        press: Press | None = None,
        context_len: int | None = None,
        parent: int | None = None,
        decode_press: Press | None = None,
        decode_budget: int | None = None,
        cache_salt: str = "",
    ) -> int:
        """Queue a request; returns its id. Raises InvalidRequestError if it can never run.

        With the prefix cache on, a request without a press reuses the cached
        blocks of the longest prefix it shares with earlier requests of the
        same `cache_salt` (a tenant's secret: other tenants never hit its
        prefixes), and leaves its own full blocks cached when it finishes.

        With `press`, the first `context_len` prompt tokens (default: all) are
        compressed as soon as they are cached, before the rest of the prompt is
        seen. With `parent` (the id of a context from `add_context`), the
        request continues that compressed context: `prompt_ids` are only the
        tokens that follow it. With `decode_press` and `decode_budget`, each
        kv-head is cut back to `decode_budget` tokens by that press whenever it
        has grown a block past it (from the first decode step on), so long
        outputs run in bounded memory.
        """
        params = params or SamplingParams()
        parent_seq = self._context(parent) if parent is not None else None
        self._check_prompt(prompt_ids, allow_empty=False)
        full = (parent_seq.prompt_ids if parent_seq else []) + list(prompt_ids)
        if len(full) >= self.model.max_context_len:
            raise InvalidRequestError(
                f"the prompt has {len(full)} tokens; the model's context is "
                f"{self.model.max_context_len} tokens, which must hold the prompt and at least one new token"
            )
        if context_len is not None and not 0 < context_len <= len(prompt_ids):
            raise InvalidRequestError(f"context_len must be in [1, {len(prompt_ids)}], got {context_len}")
        if not isinstance(cache_salt, str):
            raise InvalidRequestError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        seq = Sequence(next(self._ids), full, params, press=press, parent=parent_seq, cache_salt=cache_salt)
        seq.context_len = context_len if context_len is not None else len(prompt_ids)
        if press is not None:
            press.validate(seq.context_len, self.model.num_layers)
        if (decode_press is None) != (decode_budget is None):
            raise InvalidRequestError("decode_press and decode_budget go together")
        if decode_press is not None and decode_budget is not None:
            check_decode_budget(decode_press, decode_budget, self.cache.block_size)
            if press is not None and not isinstance(press, ScorePress):
                raise InvalidRequestError("decoding-time compression needs the same budget in every head")
            seq.decode_press, seq.decode_budget = decode_press, decode_budget
        return self._queue(seq)

    def add_context(
        self, context_ids: list[int], press: Press | None = None, keep_queries: bool = False
    ) -> int:
        """Queue a context to prefill (and compress with `press`) once; returns its id.

        Requests continue it with `add_request(..., parent=id)`. With
        `keep_queries`, each layer's queries are kept so that `compress_context`
        can make compressed copies of it, one per press, without a new prefill.
        The context holds its blocks until `release(id)`.
        """
        self._check_prompt(context_ids, allow_empty=False)
        if len(context_ids) >= self.model.max_context_len:
            raise InvalidRequestError(
                f"the context has {len(context_ids)} tokens; the model's context is {self.model.max_context_len}"
            )
        if press is not None and keep_queries:
            raise InvalidRequestError("keep_queries is for contexts compressed later, not with a press now")
        if press is not None:
            press.validate(len(context_ids), self.model.num_layers)
        seq = Sequence(next(self._ids), list(context_ids), SamplingParams(max_tokens=1), press=press)
        seq.context_len, seq.is_context, seq.keep_queries = len(context_ids), True, keep_queries
        return self._queue(seq)

    def compress_context(self, context_id: int, press: Press) -> int:
        """A new context: a copy of a ready `keep_queries` context, compressed by `press`.

        The same cache as `add_context(ids, press)` would give (presses run after
        the forward pass either way), without prefilling again.
        """
        parent = self._context(context_id)
        press.validate(parent.context_len, self.model.num_layers)
        if not parent.compressed or not parent.queries:
            raise InvalidRequestError(f"context {context_id} is not ready or was not added with keep_queries")
        assert parent.kv is not None
        kv = self.cache.fork(parent.kv)
        self.runner.compress(kv, parent.queries, press)
        seq = Sequence(next(self._ids), parent.prompt_ids, parent.params, press=press, kv=kv)
        seq.context_len, seq.is_context, seq.compressed = parent.context_len, True, True
        seq.num_computed, seq.status = parent.num_computed, Status.RUNNING
        self.sequences[seq.seq_id] = seq
        self.scheduler.running.append(seq)
        self.scheduler.on_compressed(seq)
        return seq.seq_id

    def _check_prompt(self, prompt_ids: list[int], allow_empty: bool) -> None:
        vocab = self.model.config.vocab_size
        if not prompt_ids and not allow_empty:
            raise InvalidRequestError("the prompt is empty")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")

    def _context(self, seq_id: int) -> Sequence:
        seq = self.sequences.get(seq_id)
        if (
            seq is None
            or not seq.is_context
            or (seq.is_finished and seq.seq_id not in self.scheduler.contexts)
        ):
            raise InvalidRequestError(
                f"no context with id {seq_id} (it must come from add_context and not be released)"
            )
        return seq

    def _queue(self, seq: Sequence) -> int:
        if self.scheduler.worst_case_blocks(seq) > self.pool.num_blocks:
            raise InvalidRequestError(
                f"a prompt of {len(seq.prompt_ids)} tokens plus max_tokens={seq.params.max_tokens} needs more "
                f"KV memory than the pool holds ({self.pool.capacity_bytes} bytes); "
                "raise max_kv_bytes or lower max_tokens"
            )
        if not seq.params.greedy:
            seq.generator = torch.Generator()
            seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else torch.seed())
        self.sequences[seq.seq_id] = seq
        self.scheduler.add(seq)
        self.num_prompt_tokens += len(seq.prompt_ids)
        if self.prefix is not None:
            self.prefix.prefetch(seq)
        return seq.seq_id

    def add_public_prefix(self, token_ids: list[int]) -> None:
        """Let every tenant share the cached blocks of these tokens, e.g. a common system prompt.

        A prompt's whole blocks that match a public prefix are cached without
        the tenant's salt; everything after them stays the tenant's own.
        """
        if self.prefix is None:
            raise InvalidRequestError("public prefixes need the prefix cache (CacheConfig.prefix_cache)")
        self._check_prompt(list(token_ids), allow_empty=False)
        self.prefix.add_public_prefix(list(token_ids))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def run(self) -> None:
        """Step until every request and context added so far has finished.

        Raises RuntimeError if the scheduler can run none of them (they would wait forever).
        """
        while self.has_unfinished():
            self.step()
            if self.last_step_size == 0:
                raise RuntimeError("the scheduler can run none of the unfinished requests")

    def abort(self, seq_id: int) -> None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored."""
        seq = self.sequences.get(seq_id)
        if seq is not None and not seq.is_finished:
            self._finish(seq, "abort")

    def step(self) -> list[TokenEvent]:
        """Run one forward pass; returns the tokens it produced."""
        batch = self.scheduler.schedule()
        self.last_step_size = len(batch)
        if not batch:
            return []
        inputs = [self._step_input(seq, n) for seq, n in batch]
        self.step_errors = {}
        try:
            logits = self.runner.forward(inputs)
        except KVEngineError as exc:
            # A press refused its input in the middle of a shared forward pass. The caches
            # of this step's requests are half written: end them all and keep serving.
            for seq, _ in batch:
                self._finish(seq, "error")
                self.step_errors[seq.seq_id] = exc
            return []
        # The peak is before compression: the press sees the whole context first.
        self.peak_bytes_in_use = max(self.peak_bytes_in_use, self.pool.bytes_in_use)
        for (seq, n), item in zip(batch, inputs, strict=True):
            self.num_prefill_tokens += min(n, max(0, len(seq.prompt_ids) - seq.num_computed))
            prefilling = seq.is_prefilling
            seq.num_computed += n
            if prefilling and not seq.is_prefilling and self.prefix is not None and seq.is_plain:
                self.prefix.publish(seq)  # requests arriving while it decodes reuse its prompt
            self._keep_queries(seq, item.queries)
            if not seq.compressed and seq.num_computed == seq.context_len and (item.press or seq.is_context):
                seq.compressed = True
                if item.press is not None:
                    self._on_press_done(seq)
                self.scheduler.on_compressed(seq)
        # Ready for a new token: every known token computed (a recomputed sequence
        # after preemption has its earlier outputs to compute again first).
        ready = [
            i for i, (seq, _) in enumerate(batch) if seq.num_computed == seq.num_tokens and not seq.is_context
        ]
        for i in ready:
            self._compress_while_decoding(batch[i][0])
        tokens = sample(
            logits[ready],
            [batch[i][0].params for i in ready],
            [batch[i][0].generator for i in ready],
        )
        now = time.perf_counter()
        events = []
        for i, token in zip(ready, tokens, strict=True):
            seq = batch[i][0]
            seq.output_ids.append(token)
            seq.first_token_time = seq.first_token_time or now
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self._finish(seq, reason)
            events.append(TokenEvent(seq.seq_id, token, reason is not None, reason))
        return events

    def _step_input(self, seq: Sequence, n: int) -> StepInput:
        assert seq.kv is not None
        ids = seq.token_ids[seq.num_computed : seq.num_computed + n]
        compress = seq.awaits_compression and seq.num_computed + n == seq.context_len
        return StepInput(
            seq.kv,
            ids,
            seq.num_computed,
            seq.press if compress else None,
            keep_queries=seq.keep_queries or seq.decode_press is not None,
            seal=not seq.keep_queries,
        )

    def _keep_queries(self, seq: Sequence, queries: dict[int, torch.Tensor]) -> None:
        """Store this step's queries: all of a kept context's, the last few for decoding-time presses."""
        for layer, q in queries.items():
            if seq.decode_press is None:
                seq.queries[layer] = q
                continue
            old = seq.queries.get(layer)
            both = q if old is None else torch.cat([old, q], dim=1)
            seq.queries[layer] = both[:, -DECODE_QUERY_WINDOW:]

    def _compress_while_decoding(self, seq: Sequence) -> None:
        """Cut every head back to the decode budget once it has grown a block past it."""
        if seq.decode_press is None or seq.kv is None:
            return
        num_tokens = seq.kv.max_len
        if num_tokens <= seq.decode_budget + self.cache.block_size:
            return
        press = with_budget(seq.decode_press, num_tokens, seq.decode_budget)
        self.runner.compress(seq.kv, seq.queries, press, end_pos=seq.num_computed)
        self.num_decode_compressions += 1

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if not seq.params.ignore_eos and token in self.model.eos_token_ids:
            return "stop"
        if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.model.max_context_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_time = time.perf_counter()
        if seq.kv is not None:
            seq.kv_bytes = self.cache.bytes_held(seq.kv)
        self.scheduler.finish(seq, reason)

    def release(self, seq_id: int) -> Sequence:
        """Forget a finished request or a context and return it; a context's blocks are freed."""
        seq = self.sequences[seq_id]
        if seq.status is not Status.FINISHED:
            raise ValueError(f"request {seq_id} has not finished")
        if seq_id in self.scheduler.contexts:
            if any(s.parent is seq and s.status is Status.WAITING for s in self.sequences.values()):
                raise ValueError(f"context {seq_id} still has requests waiting to continue it")
            seq.kv_bytes = self.cache.bytes_held(seq.kv) if seq.kv is not None else 0
            self.scheduler.finish(seq, "context")
        return self.sequences.pop(seq_id)

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        cache_salt: str = "",
    ) -> list[RequestOutput]:
        """Run `prompts` (token ids) to the end in one batch; returns their outputs in order.

        `params` is one `SamplingParams` for all prompts or one per prompt.
        Requests added earlier keep running alongside. If any prompt can never
        run, InvalidRequestError is raised and none of them is left queued.
        """
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(per_prompt)} sampling parameters")
        ids: list[int] = []
        try:
            for prompt, p in zip(prompts, per_prompt, strict=True):
                ids.append(self.add_request(list(prompt), p, cache_salt=cache_salt))
        except InvalidRequestError:
            for seq_id in ids:
                self.abort(seq_id)
                self.release(seq_id)
            raise
        while not all(self.sequences[i].is_finished for i in ids):
            self.step()
            if self.last_step_size == 0:
                raise RuntimeError("the scheduler can run none of the unfinished requests")
        return [RequestOutput.of(self.release(i)) for i in ids]

    def _on_press_done(self, seq: Sequence) -> None:
        """Count what a press saved, and keep the compressed context for later requests."""
        assert seq.kv is not None
        self.num_compressions += 1
        if self.prefix is not None and reuses_compressed(seq):
            self.prefix.compressed.store(seq)
        uncompressed = self.cache.blocks_for_tokens(seq.context_len) * self.pool.bytes_per_block
        self.num_compressed_bytes_saved += max(0, uncompressed - self.cache.bytes_held(seq.kv))

    def stats(self) -> dict[str, float]:
        """A snapshot of the engine's gauges and counters, for metrics (see `memory.engine_stats`)."""
        return engine_stats(self)

    def close(self) -> None:
        """Flush and close the prefix cache's storage tiers (nothing to do without them).

        Call once, at shutdown, after the last step.
        """
        if self.prefix is not None:
            self.prefix.close()

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def check_invariants(self) -> None:
        """Raise AssertionError unless every block is free, or held exactly by its holders.

        Holders are running sequences, kept contexts and the prefix cache
        (see `prefix.check_ownership`).
        """
        live = [*self.scheduler.running, *self.scheduler.contexts.values()]
        holders = [s.kv for s in live if s.kv is not None]
        if self.prefix is not None:
            holders += self.prefix.compressed.holders()
        check_ownership(self.pool, holders, self.prefix)
