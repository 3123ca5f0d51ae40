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
contexts it completes), and postprocess (postprocess.py) advances each sequence, compresses
while decoding, samples, and finishes the sequences that stop. Requests are
checked and made into sequences by `Intake` (intake.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kvengine.cache.paged import KVPool, PagedKVCache, SequenceKV
from kvengine.cache.prefix import PrefixCache, check_ownership
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.constraints import Grammars
from kvengine.engine.intake import Intake
from kvengine.engine.memory import make_pool, make_prefix_cache, memory_stats
from kvengine.engine.postprocess import Postprocess
from kvengine.engine.request import RequestOutput, SamplingParams, Sequence, Status, TokenEvent
from kvengine.engine.runner import ModelRunner, StepInput
from kvengine.engine.scheduler import Scheduler
from kvengine.engine.selection import BlockSelection
from kvengine.engine.step import step_input
from kvengine.errors import InvalidRequestError, KVEngineError, StepError
from kvengine.models import LoadedModel
from kvengine.press.base import Press


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
        if self.cache_config.select_blocks:
            self.runner.select_blocks(BlockSelection(fraction=self.cache_config.select_blocks))
        self.intake = Intake(model, self.cache.block_size)
        self.grammars = Grammars(model.tokenizer, int(model.config.vocab_size))
        self.shared_prompts: dict[int, set[int]] = {}  # context of `add_parallel` -> its requests left
        self.prefix: PrefixCache | None = None
        if self.cache_config.prefix_cache:
            self.prefix = make_prefix_cache(self.cache_config, self.cache, model.name)
        self.scheduler = Scheduler(scheduler_config, self.cache, model.max_context_len, self.prefix)
        self.sequences: dict[int, Sequence] = {}
        self.post = Postprocess(model, self.cache, self.runner, self.scheduler)
        self.peak_bytes_in_use = 0
        self.num_prompt_tokens = 0  # prompt tokens of queued requests, cached ones included
        self.step_errors: dict[int, KVEngineError] = {}  # requests the last step ended with an error
        self.last_step_size = 0  # sequences in the last step's forward pass

    @property
    def pool(self) -> KVPool:
        return self.cache.pool

    @property
    def num_decode_compressions(self) -> int:
        return self.post.num_decode_compressions

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

    def add_kv_context(self, context_ids: list[int], kv: SequenceKV) -> int:
        """A ready context of `context_ids` whose cache `kv` (this pool's blocks, handed over) was filled elsewhere, e.g. by kvengine.rag."""
        seq = self.intake.context(context_ids, None, False)
        if not kv.is_uniform or kv.max_len != len(context_ids) or kv.next_pos != len(context_ids):
            raise InvalidRequestError(
                f"the cache does not hold positions 0..{len(context_ids) - 1} in every cell"
            )
        self.sequences[seq.seq_id] = seq
        self.scheduler.add_ready_context(seq, kv, len(context_ids))
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

    def add_parallel(
        self, prompt_ids: list[int], params: list[SamplingParams], *, cache_salt: str = "", **kwargs: Any
    ) -> list[int]:
        """Queue one request per `params` on one prompt, prefilled once (OpenAI's `n`); returns their ids.

        The prompt but its last token is a context, prefilled once; each
        request continues a fork of it (its blocks shared, each cell's partly
        filled last block copied), computes the last token itself and samples on
        its own. The context goes with the last of its requests (`release`).
        With other arguments of `add_request` (a press), prompt log-probabilities
        or a one-token prompt, the requests run on their own. If one is
        refused, none is left queued.
        """
        kwargs = {name: value for name, value in kwargs.items() if value is not None}
        calls: list[tuple[list[int], SamplingParams | None, int | None]] = [
            (list(prompt_ids), p, None) for p in params
        ]
        shared = len(params) > 1 and len(prompt_ids) > 1 and not kwargs
        if not shared or any(p.prompt_logprobs is not None for p in params):
            return self._add_all(calls, cache_salt, kwargs)
        context = self.add_context(list(prompt_ids[:-1]))
        try:
            ids = self._add_all([([prompt_ids[-1]], p, context) for p in params], cache_salt, {})
        except InvalidRequestError:
            self.abort(context)
            self.release(context)
            raise
        self.shared_prompts[context] = set(ids)
        return ids

    def _add_all(
        self,
        calls: list[tuple[list[int], SamplingParams | None, int | None]],
        cache_salt: str,
        kwargs: dict[str, Any],
    ) -> list[int]:
        """`add_request` each (prompt, params, parent); if one is refused, the ones added go again."""
        ids: list[int] = []
        try:
            for prompt, p, parent in calls:
                ids.append(self.add_request(prompt, p, parent=parent, cache_salt=cache_salt, **kwargs))
        except InvalidRequestError:
            for seq_id in ids:
                self.abort(seq_id)
                self.release(seq_id)
            raise
        return ids

    def _queue(self, seq: Sequence) -> int:
        if seq.params.grammar is not None:
            seq.matcher = self.grammars.matcher(seq.params.grammar)
        self.scheduler.add(seq)  # raises InvalidRequestError if it could never fit in the pool
        if not seq.params.greedy:  # its own generator: its tokens do not depend on its batch
            # On the model's device: sampling draws where the logits are, with no copy to the host.
            seq.generator = torch.Generator(device=self.model.device)
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
        calls: list[tuple[list[int], SamplingParams | None, int | None]] = [
            (list(prompt), p, None) for prompt, p in zip(prompts, per_prompt, strict=True)
        ]
        ids = self._add_all(calls, cache_salt, {})
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
        return [] if logits is None else self.post.process(batch, inputs, logits, self.step_errors)

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
        self.shared_prompts.pop(seq_id, None)
        self._release_shared(seq)
        return self.sequences.pop(seq_id)

    def _release_shared(self, seq: Sequence) -> None:
        """Release the context of an `add_parallel` request once its last request is released."""
        children = self.shared_prompts.get(seq.parent.seq_id) if seq.parent is not None else None
        if children is None or seq.parent is None:
            return
        children.discard(seq.seq_id)
        if not children:
            self.abort(seq.parent.seq_id)  # a no-op for a ready context; one still prefilling ends
            self.release(seq.parent.seq_id)

    def stats(self) -> dict[str, float]:
        """A snapshot of the engine's gauges and counters, for metrics: its own, then its parts'.

        Keys ending in `_total` only grow (counters); the others are gauges.
        """
        return {
            "prompt_tokens_total": self.num_prompt_tokens,
            **self.post.stats(),
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
