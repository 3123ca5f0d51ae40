"""Chooses the work of the next forward pass: which sequences, how many tokens each.

Every running sequence advances by its uncomputed tokens (its prompt, in
chunks, then one token per step), within a token budget per step; waiting
sequences are admitted first come, first served while the pool can hold the
worst case of everything admitted (prompt plus `max_tokens` each). That
reservation means a running sequence never runs out of blocks, so nothing is
preempted. A compressed sequence's reservation shrinks to what it holds plus
what it can still grow, which is how compression lets more requests in.

A sequence with a press prefills its context in one chunk (the press sees the
whole context at once) and is compressed right after; a sequence that
continues a compressed context (`parent`) waits until that context is ready
and starts from a fork of it.
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
        self.contexts: dict[int, Sequence] = {}  # compressed contexts kept for their children
        self._reserved: dict[int, int] = {}  # seq_id -> blocks reserved for its worst case

    def worst_case_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` can hold at most if it generates all of `max_tokens`."""
        generated = 0 if seq.is_context else seq.params.max_tokens
        if seq.parent is not None:
            # A fork copies each cell's partly filled last block and grows from there.
            cells = self.cache.num_layers * self.cache.num_kv_heads
            new_tokens = len(seq.prompt_ids) - seq.parent.num_computed + generated
            return cells + self.cache.blocks_for_tokens(new_tokens)
        tokens = min(len(seq.prompt_ids) + generated, self.max_context_len)
        if seq.decode_press is not None:
            # Never more than the prompt or the budget plus a block, and while a layer
            # is cut back its kept tokens are copied before the old blocks go.
            bs = self.cache.block_size
            tokens = min(tokens, max(len(seq.prompt_ids), seq.decode_budget + bs) + 1)
            copy = self.cache.num_kv_heads * -(-seq.decode_budget // bs)
            return self.cache.blocks_for_tokens(tokens) + copy
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
            n = self._chunk(seq, budget, first=not batch)
            if n:
                batch.append((seq, n))
                budget -= n
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if seq.parent is not None and not seq.parent.compressed:
                continue  # its context is not ready yet; do not hold up the others
            blocks = self.worst_case_blocks(seq)
            if sum(self._reserved.values()) + blocks > self.cache.pool.num_blocks:
                break
            self._admit(seq, blocks)
            n = self._chunk(seq, budget, first=not batch)
            if n:
                batch.append((seq, n))
                budget -= n
        return batch

    def _chunk(self, seq: Sequence, budget: int, first: bool) -> int:
        """Tokens `seq` computes this step; a context to compress goes in one piece."""
        remaining = seq.num_tokens - seq.num_computed
        if seq.awaits_compression:
            whole = seq.context_len - seq.num_computed
            return whole if whole <= budget or first else 0
        return max(0, min(remaining, budget))

    def _admit(self, seq: Sequence, blocks: int) -> None:
        self.waiting.remove(seq)
        self._reserved[seq.seq_id] = blocks
        seq.status = Status.RUNNING
        if seq.parent is not None:
            assert seq.parent.kv is not None
            seq.kv = self.cache.fork(seq.parent.kv)
            seq.num_computed = seq.parent.num_computed
        else:
            seq.kv = self.cache.new_sequence()
        self.running.append(seq)

    def on_compressed(self, seq: Sequence) -> None:
        """Shrink `seq`'s reservation to its blocks plus its worst-case growth."""
        assert seq.kv is not None
        growth = 0 if seq.is_context else seq.num_tokens - seq.num_computed + seq.params.max_tokens
        held = int(seq.kv.num_blocks.sum())
        self._reserved[seq.seq_id] = held + self.cache.blocks_needed(seq.kv, growth)
        if seq.is_context:
            self.running.remove(seq)
            self.contexts[seq.seq_id] = seq
            seq.status = Status.FINISHED
            seq.finish_reason = "context"

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished and give its blocks back to the pool at once."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.RUNNING:
            self.running.remove(seq)
        self.contexts.pop(seq.seq_id, None)
        self._reserved.pop(seq.seq_id, None)
        if seq.kv is not None:
            self.cache.free(seq.kv)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
