"""The engine: requests in, tokens out, one forward pass per `step()`.

The engine works on token ids only; it knows nothing about text, chat
templates or stop strings (see `generate.py`). It owns the block pool, the
scheduler, the prefix cache (when `CacheConfig.prefix_cache` is on) and the
model runner, and guarantees that a finished or aborted request's blocks are
back in the pool, or kept by the prefix cache, when `step()` or `abort()`
returns. `generate` runs a batch to the end; `AsyncEngine` (async_engine.py)
streams tokens per request.

A step is schedule -> run -> postprocess: the scheduler picks the sequences
and their new tokens, the runner runs the forward pass (and the presses of
contexts it completes), and postprocess advances each sequence, compresses
while decoding, samples, and finishes the sequences that stop. Requests are
checked and made into sequences by `Intake` (intake.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kvengine.cache.paged import KVPool, PagedKVCache
from kvengine.cache.prefix import PrefixCache, check_ownership
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.intake import Intake
from kvengine.engine.logprobs import Logprob, token_logprobs
from kvengine.engine.memory import make_pool, make_prefix_cache, memory_stats
from kvengine.engine.request import RequestOutput, SamplingParams, Sequence, Status, TokenEvent
from kvengine.engine.runner import ModelRunner, StepInput
from kvengine.engine.sampler import sample
from kvengine.engine.scheduler import Scheduler
from kvengine.engine.step import step_input, stop_reason
from kvengine.errors import InvalidRequestError, KVEngineError, StepError
from kvengine.models import LoadedModel
from kvengine.press.base import Press, with_budget


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
        self.intake = Intake(model, self.cache.block_size)
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

    @property
    def pool(self) -> KVPool:
        return self.cache.pool

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # ---- requests in ------------------------------------------------------------------------

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
        parent_seq = self._context(parent) if parent is not None else None
        seq = self.intake.request(
            prompt_ids,
            params or SamplingParams(),
            press=press,
            context_len=context_len,
            parent=parent_seq,
            decode_press=decode_press,
            decode_budget=decode_budget,
            cache_salt=cache_salt,
        )
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
        return self._queue(self.intake.context(context_ids, press, keep_queries))

    def compress_context(self, context_id: int, press: Press) -> int:
        """A new context: a copy of a ready `keep_queries` context, compressed by `press`.

        The same cache as `add_context(ids, press)` would give (presses run after
        the forward pass either way), without prefilling again.
        """
        parent = self._context(context_id)
        if not parent.compressed or not parent.queries:
            raise InvalidRequestError(f"context {context_id} is not ready or was not added with keep_queries")
        seq = self.intake.compressed_copy(parent, press)
        assert parent.kv is not None
        kv = self.cache.fork(parent.kv)
        self.runner.compress(kv, parent.queries, press)
        self.sequences[seq.seq_id] = seq
        self.scheduler.add_ready_context(seq, kv, parent.num_computed)
        return seq.seq_id

    def add_public_prefix(self, token_ids: list[int]) -> None:
        """Let every tenant share the cached blocks of these tokens, e.g. a common system prompt.

        A prompt's whole blocks that match a public prefix are cached without
        the tenant's salt; everything after them stays the tenant's own.
        """
        if self.prefix is None:
            raise InvalidRequestError("public prefixes need the prefix cache (CacheConfig.prefix_cache)")
        self.intake.check_prompt(list(token_ids))
        self.prefix.add_public_prefix(list(token_ids))

    def _context(self, seq_id: int) -> Sequence:
        seq = self.sequences.get(seq_id)
        if seq is None or not seq.is_context or (seq.is_finished and seq_id not in self.scheduler.contexts):
            raise InvalidRequestError(
                f"no context with id {seq_id} (it must come from add_context and not be released)"
            )
        return seq

    def _queue(self, seq: Sequence) -> int:
        self.scheduler.add(seq)  # raises InvalidRequestError if it could never fit in the pool
        if not seq.params.greedy:  # its own generator: its tokens do not depend on its batch
            seq.generator = torch.Generator()
            seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else torch.seed())
        self.sequences[seq.seq_id] = seq
        self.num_prompt_tokens += len(seq.prompt_ids)
        return seq.seq_id

    # ---- running ----------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def run(self) -> None:
        """Step until every request and context added so far has finished.

        Raises RuntimeError if the scheduler can run none of them (they would wait forever).
        """
        self._step_until(lambda: not self.has_unfinished())

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
        self._step_until(lambda: all(self.sequences[i].is_finished for i in ids))
        return [RequestOutput.of(self.release(i)) for i in ids]

    def _step_until(self, done: Callable[[], bool]) -> None:
        while not done():
            self.step()
            if self.last_step_size == 0:
                raise RuntimeError("the scheduler can run none of the unfinished requests")

    def step(self) -> list[TokenEvent]:
        """Run one forward pass: schedule -> run -> postprocess; returns the tokens it produced."""
        batch = self.scheduler.schedule()
        self.last_step_size = len(batch)
        if not batch:
            return []
        inputs = [step_input(seq, n, self.prefix is not None) for seq, n in batch]
        logits = self._run(batch, inputs)
        return [] if logits is None else self._postprocess(batch, inputs, logits)

    def _run(self, batch: list[tuple[Sequence, int]], inputs: list[StepInput]) -> torch.Tensor | None:
        """The forward pass (and the presses after it): logits, or None if it failed."""
        self.step_errors = {}
        try:
            logits = self.runner.forward(inputs)
        except Exception as exc:
            # A press refused its input, or the forward itself failed, in a shared step: this
            # step's caches are half written. End its requests (caching none of their blocks)
            # and keep serving the others.
            error = exc if isinstance(exc, KVEngineError) else StepError(f"{type(exc).__name__}: {exc}")
            for seq, _ in batch:
                self.scheduler.finish(seq, "error")
                self.step_errors[seq.seq_id] = error
            return None
        # The peak is after the prefill presses of this step and before any decoding-time press.
        self.peak_bytes_in_use = max(self.peak_bytes_in_use, self.pool.bytes_in_use)
        return logits

    def _postprocess(
        self, batch: list[tuple[Sequence, int]], inputs: list[StepInput], logits: torch.Tensor
    ) -> list[TokenEvent]:
        """Advance each sequence past its new tokens, then give a token to those ready for one."""
        for (seq, n), item in zip(batch, inputs, strict=True):
            self._advance(seq, n, item)
        # Ready for a new token: every known token computed (a recomputed sequence
        # after preemption has its earlier outputs to compute again first).
        rows = [
            i for i, (seq, _) in enumerate(batch) if seq.num_computed == seq.num_tokens and not seq.is_context
        ]
        rows = self._drop_non_finite(batch, rows, logits)
        scored = [batch[i][0] for i in rows if batch[i][0].params.max_tokens == 0]  # the prompt only
        rows = [i for i in rows if batch[i][0].params.max_tokens > 0]
        ready = [batch[i][0] for i in rows]
        for seq in ready:
            self._compress_while_decoding(seq)
        ready_logits = logits[rows]
        tokens = sample(
            ready_logits,
            [seq.params for seq in ready],
            [seq.generator for seq in ready],
            [(seq.prompt_ids, seq.output_ids) for seq in ready],
        )
        return self._end_scored(scored) + self._append_tokens(ready, tokens, ready_logits)

    def _drop_non_finite(
        self, batch: list[tuple[Sequence, int]], rows: list[int], logits: torch.Tensor
    ) -> list[int]:
        """`rows` whose logits are all finite; the sequences of the others fail (and only they)."""
        finite = torch.isfinite(logits[rows]).all(dim=-1).tolist()  # one host sync per step
        for i, ok in zip(rows, finite, strict=True):
            if not ok:
                seq = batch[i][0]
                self.scheduler.finish(seq, "error")
                self.step_errors[seq.seq_id] = StepError("the model produced non-finite logits (NaN or inf)")
        return [i for i, ok in zip(rows, finite, strict=True) if ok]

    def _advance(self, seq: Sequence, num_tokens: int, item: StepInput) -> None:
        """After a step: the scheduler advances `seq` (see `on_computed`); keep its queries, count a press."""
        self.num_prefill_tokens += min(num_tokens, max(0, len(seq.prompt_ids) - seq.num_computed))
        self.scheduler.on_computed(seq, num_tokens)
        seq.store_queries(item.queries)
        if item.logits is not None:
            seq.add_prompt_logprobs(item.start_pos, item.logits)
        if item.press is not None:  # the runner compressed its context after this forward
            assert seq.kv is not None
            self.num_compressions += 1
            uncompressed = self.cache.blocks_for_tokens(seq.context_len) * self.pool.bytes_per_block
            self.num_compressed_bytes_saved += max(0, uncompressed - self.cache.bytes_held(seq.kv))

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

    def _append_tokens(
        self, seqs: list[Sequence], tokens: list[int], logits: torch.Tensor
    ) -> list[TokenEvent]:
        """Give each sequence its sampled token (row i of `logits` gave seqs[i]'s); finish those that stop."""
        now = time.perf_counter()
        events = []
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            seq.output_ids.append(token)
            seq.first_token_time = seq.first_token_time or now
            logprob = None
            if seq.params.logprobs is not None:
                logprob = token_logprobs(logits[i : i + 1], [token], seq.params.logprobs)[0]
                seq.output_logprobs.append(logprob)
            reason = stop_reason(seq, token, self.model)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            prompt = _prompt_logprobs(seq) if len(seq.output_ids) == 1 else None
            events.append(TokenEvent(seq.seq_id, token, reason is not None, reason, logprob, prompt))
        return events

    def _end_scored(self, seqs: list[Sequence]) -> list[TokenEvent]:
        """Finish requests that only score their prompt (`max_tokens=0`), now that it is computed."""
        for seq in seqs:
            self.scheduler.finish(seq, "length")
        return [TokenEvent(s.seq_id, None, True, "length", prompt_logprobs=_prompt_logprobs(s)) for s in seqs]

    # ---- requests out -----------------------------------------------------------------------

    def abort(self, seq_id: int) -> None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored."""
        seq = self.sequences.get(seq_id)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    def release(self, seq_id: int) -> Sequence:
        """Forget a finished request or a context and return it; a context's blocks are freed."""
        seq = self.sequences[seq_id]
        if seq.status is not Status.FINISHED:
            raise ValueError(f"request {seq_id} has not finished")
        if seq_id in self.scheduler.contexts:
            if any(s.parent is seq and s.status is Status.WAITING for s in self.sequences.values()):
                raise ValueError(f"context {seq_id} still has requests waiting to continue it")
            self.scheduler.finish(seq, "context")
        return self.sequences.pop(seq_id)

    def stats(self) -> dict[str, float]:
        """A snapshot of the engine's gauges and counters, for metrics: its own, then its parts'.

        Keys ending in `_total` only grow (counters); the others are gauges.
        """
        return {
            "prompt_tokens_total": self.num_prompt_tokens,
            "prefill_tokens_total": self.num_prefill_tokens,
            "compressions_total": self.num_compressions,
            "compression_bytes_saved_total": self.num_compressed_bytes_saved,
            "decode_compressions_total": self.num_decode_compressions,
            **self.scheduler.stats(),
            **memory_stats(self.pool, self.prefix),
        }

    def close(self) -> None:
        """Flush and close the prefix cache's storage tiers, if any; once, after the last step."""
        if self.prefix is not None:
            self.prefix.close()

    def check_invariants(self) -> None:
        """Raise AssertionError unless every block is free, or held exactly by its holders.

        Holders are running sequences, kept contexts and the prefix cache
        (see `prefix.check_ownership`).
        """
        live = [*self.scheduler.running, *self.scheduler.contexts.values()]
        check_ownership(self.pool, [s.kv for s in live if s.kv is not None], self.prefix)


def _prompt_logprobs(seq: Sequence) -> list[Logprob | None] | None:
    return list(seq.prompt_logprobs) if seq.params.prompt_logprobs is not None else None
