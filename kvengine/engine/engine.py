"""The engine: requests in, tokens out, one forward pass per `step()`.

The engine works on token ids only; it knows nothing about text, chat
templates or stop strings (see `generate.py`). It owns the block pool, the
scheduler and the model runner, and guarantees that a finished or aborted
request's blocks are back in the pool when `step()` or `abort()` returns.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from kvengine.cache.paged import PagedKVCache
from kvengine.cache.pool import BlockPool
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.request import SamplingParams, Sequence, Status
from kvengine.engine.runner import ModelRunner, StepInput
from kvengine.engine.sampler import sample
from kvengine.engine.scheduler import Scheduler
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel


@dataclass(frozen=True)
class TokenEvent:
    """A token produced for a request in one step."""

    seq_id: int
    token_id: int
    finished: bool
    finish_reason: str | None


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
        pool = BlockPool.with_capacity(
            self.cache_config.max_kv_bytes, self.cache_config.block_size, model.head_dim, model.dtype
        )
        self.cache = PagedKVCache(pool, model.num_layers, model.num_kv_heads)
        self.runner = ModelRunner(model, self.cache)
        self.scheduler = Scheduler(scheduler_config or SchedulerConfig(), self.cache, model.max_context_len)
        self.sequences: dict[int, Sequence] = {}
        self.peak_bytes_in_use = 0
        self._ids = itertools.count()

    @property
    def pool(self) -> BlockPool:
        return self.cache.pool

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. Raises InvalidRequestError if it can never run."""
        params = params or SamplingParams()
        vocab = self.model.config.vocab_size
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) >= self.model.max_context_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                f"{self.model.max_context_len} tokens, which must hold the prompt and at least one new token"
            )
        seq = Sequence(next(self._ids), list(prompt_ids), params)
        if self.scheduler.worst_case_blocks(seq) > self.pool.num_blocks:
            raise InvalidRequestError(
                f"a prompt of {len(prompt_ids)} tokens plus max_tokens={params.max_tokens} needs more "
                f"KV memory than the pool holds ({self.pool.capacity_bytes} bytes); "
                "raise max_kv_bytes or lower max_tokens"
            )
        if not params.greedy:
            seq.generator = torch.Generator()
            seq.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self.sequences[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, seq_id: int) -> None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored."""
        seq = self.sequences.get(seq_id)
        if seq is not None and not seq.is_finished:
            self._finish(seq, "abort")

    def step(self) -> list[TokenEvent]:
        """Run one forward pass; returns the tokens it produced."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        inputs = [
            StepInput(seq.kv, seq.token_ids[seq.num_computed : seq.num_computed + n], seq.num_computed)
            for seq, n in batch
            if seq.kv is not None
        ]
        logits = self.runner.forward(inputs)
        self.peak_bytes_in_use = max(self.peak_bytes_in_use, self.pool.bytes_in_use)
        for seq, n in batch:
            seq.num_computed += n
        ready = [i for i, (seq, _) in enumerate(batch) if not seq.is_prefilling]
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
        """Forget a finished request and return it (its blocks are already free)."""
        seq = self.sequences[seq_id]
        if seq.status is not Status.FINISHED:
            raise ValueError(f"request {seq_id} has not finished")
        return self.sequences.pop(seq_id)
