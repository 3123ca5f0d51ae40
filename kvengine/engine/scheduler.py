"""Chooses the work of the next forward pass: which sequences, how many tokens each.

Every running sequence advances by its uncomputed tokens (its prompt, in
chunks, then one token per step), within a token budget per step; waiting
sequences are admitted first come, first served while the pool can hold the
worst case of everything admitted (prompt plus `max_tokens` each). That
reservation means a running sequence never runs out of blocks, so nothing is
preempted; compression and preemption will loosen it.
"""

from __future__ import annotations

from collections import deque

from kvengine.cache.paged import PagedKVCache
from kvengine.config import SchedulerConfig
from kvengine.engine.request import Sequence, Status


class Scheduler:
    """FCFS admission under a block reservation, chunked prefill under a token budget."""

    def __init__(self, config: SchedulerConfig, cache: PagedKVCache, max_context_len: int) -> None:
        self.config = config
        self.cache = cache
        self.max_context_len = max_context_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._reserved: dict[int, int] = {}  # seq_id -> blocks reserved for its worst case

    def worst_case_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` holds if it generates all of `max_tokens`."""
        tokens = min(len(seq.prompt_ids) + seq.params.max_tokens, self.max_context_len)
        return self.cache.blocks_for_tokens(tokens)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Sequences of the next step with their number of new tokens, in order."""
        budget = self.config.max_step_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if budget == 0:
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            batch.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            blocks = self.worst_case_blocks(seq)
            if sum(self._reserved.values()) + blocks > self.cache.pool.num_blocks:
                break
            self.waiting.popleft()
            self._reserved[seq.seq_id] = blocks
            seq.status = Status.RUNNING
            seq.kv = self.cache.new_sequence()
            self.running.append(seq)
            n = min(seq.num_tokens, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished and give its blocks back to the pool at once."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._reserved.pop(seq.seq_id, None)
        if seq.kv is not None:
            self.cache.free(seq.kv)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
