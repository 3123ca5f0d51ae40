"""Chooses the work of the next forward pass: which sequences, how many tokens each.

Every running sequence advances by its uncomputed tokens (its prompt, in
chunks, then one token per step), within a token budget per step.

Admission. Waiting sequences are admitted while their block reservations fit
the pool and the blocks of their first chunk are free (the counts are in
reservation.py). A plain sequence (no press, no shared context) reserves what
it holds plus `GROWTH_BLOCKS` blocks of growth per cell (renewed every step);
any other sequence reserves its worst case (prompt plus `max_tokens`), shrunk to what it holds plus what it can
still grow once a press has compressed it. With a prefix cache, the waiting
sequence with the longest cached prefix goes first, but the oldest one is
passed over at most `MAX_SKIPS` times; without one, first come, first served.
Blocks of a cached prefix that running sequences reuse are counted once.

Memory. The blocks a step takes must be free before it runs: the prefix cache
evicts first; if that is not enough, the youngest running plain sequence is
preempted: its blocks go back (its full blocks into the prefix cache, if on)
and it returns to the front of the queue, to recompute its prompt and what it
generated so far. Other sequences are never preempted: their worst-case
reservations leave them room once the plain ones are gone. A packed (KIVI)
pool keeps worst-case reservations for every sequence, since a step may also
need packed blocks, which preemption does not account for.

A sequence with a press prefills its context in one chunk (the press sees the
whole context at once) and is compressed right after; a sequence that
continues a compressed context (`parent`) waits until that context is ready
and starts from a fork of it.

State. The scheduler alone changes a sequence's lifecycle: its status, cache
(`kv`), computed tokens and compression state, on admission, after each step
(`on_computed`), on preemption and when it finishes. It is also the prefix
cache's one caller for sequences: it asks it for a cache (`attach`), gives it
computed prompts (`publish`) and compressed contexts, and hands back caches
(`detach`); the prefix cache returns what it matched and changes no sequence.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvengine.cache.paged import PagedKVCache, SequenceKV
from kvengine.cache.prefix import PrefixCache
from kvengine.cache.prefix_key import PrefixKey
from kvengine.config import SchedulerConfig
from kvengine.engine.request import Sequence, Status
from kvengine.engine.reservation import (
    compressed_blocks,
    fork_blocks,
    growth_blocks,
    press_blocks,
    worst_case_blocks,
)
from kvengine.errors import InvalidRequestError

MAX_SKIPS = 8  # times the oldest waiting sequence may be passed over for a longer cached prefix
MATCH_WINDOW = 64  # waiting sequences compared for their cached prefix


@dataclass
class _Plan:
    """The step being built: (sequence, new tokens, blocks they take)."""

    items: list[tuple[Sequence, int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n, _ in self.items)

    @property
    def num_blocks(self) -> int:
        return sum(b for _, _, b in self.items)

    def remove(self, seq: Sequence) -> None:
        self.items = [item for item in self.items if item[0] is not seq]


class Scheduler:
    """Admission under block reservations, chunked prefill, eviction and preemption."""

    def __init__(
        self,
        config: SchedulerConfig,
        cache: PagedKVCache,
        max_context_len: int,
        prefix: PrefixCache | None = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.max_context_len = max_context_len
        self.prefix = prefix
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.contexts: dict[int, Sequence] = {}  # compressed contexts kept for their children
        self._reserved: dict[int, int] = {}  # seq_id -> blocks reserved (beyond a reused prefix)
        # `prefix.peek` would be asked about every waiting sequence at every step: its
        # answers are remembered until what is cached changes.
        self._peeks: dict[int, tuple[int, int]] = {}  # seq_id -> (prefix version, cached tokens)
        self._preemptive = not cache.pool.seals_blocks
        self.num_preemptions = 0

    def worst_case_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` can hold at most if it generates all of `max_tokens`."""
        return worst_case_blocks(self.cache, seq, self.max_context_len)

    def reserve_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` reserves now, besides the cached prefix it reuses."""
        if not (seq.is_plain and self._preemptive):
            return self.worst_case_blocks(seq)
        locked = self.prefix.locked_tokens(seq.seq_id) if self.prefix is not None else 0
        return growth_blocks(self.cache, seq, self.max_context_len, locked)

    def add(self, seq: Sequence) -> None:
        """Queue `seq`; the prefix cache starts reading what it may reuse from the tiers.

        Raises InvalidRequestError (and queues nothing) if its worst case could never fit in the pool.
        """
        pool = self.cache.pool
        if self.worst_case_blocks(seq) > pool.num_blocks:
            raise InvalidRequestError(
                f"a prompt of {len(seq.prompt_ids)} tokens plus max_tokens={seq.params.max_tokens} needs more "
                f"KV memory than the pool holds ({pool.capacity_bytes} bytes); "
                "raise max_kv_bytes or lower max_tokens"
            )
        self.waiting.append(seq)
        key = seq.prefix_key() if self.prefix is not None else None
        if self.prefix is not None and key is not None:
            self.prefix.prefetch(seq.seq_id, key)

    def add_ready_context(self, seq: Sequence, kv: SequenceKV, num_computed: int) -> None:
        """Take in a context already cached and compressed in `kv`; it holds it until released."""
        seq.kv, seq.num_computed, seq.compressed = kv, num_computed, True
        seq.status = Status.RUNNING
        self.running.append(seq)
        self.on_compressed(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Sequences of the next step with their number of new tokens, in order.

        The pool has the blocks for all of them when this returns (after
        evictions and preemptions, if needed).
        """
        plan = _Plan()
        preempted_before = self.num_preemptions
        for seq in list(self.running):
            if seq.status is Status.RUNNING:  # not preempted while planning this step
                self._plan_running(seq, plan)
        # After a preemption the pool is short: admitting now would only preempt again.
        while (
            self.num_preemptions == preempted_before
            and self.waiting
            and plan.num_tokens < self.config.max_step_tokens
            and len(self.running) < self.config.max_num_seqs
        ):
            picked = self._next_waiting()
            if picked is None or not self._try_admit(*picked, plan):
                break
        return [(seq, n) for seq, n, _ in plan.items]

    def _plan_running(self, seq: Sequence, plan: _Plan) -> None:
        assert seq.kv is not None
        n = self._chunk(seq, self.config.max_step_tokens - plan.num_tokens, first=not plan.items)
        if n == 0:
            return
        need = self.cache.blocks_needed(seq.kv, n)
        if self._preemptive:
            if seq.is_plain:
                self._reserved[seq.seq_id] = self.reserve_blocks(seq)
            while not self._make_room(plan.num_blocks + need):
                victim = self._youngest_plain()
                if victim is None:
                    return  # only if reservations were broken; it may fit once others finish
                self._preempt(victim, plan)
                if victim is seq:
                    return
        plan.items.append((seq, n, need))

    def _make_room(self, num_blocks: int) -> bool:
        """True if `num_blocks` blocks can be allocated, after evicting cached prefixes if needed."""
        pool = self.cache.pool
        if not pool.can_allocate(num_blocks) and self.prefix is not None:
            self.prefix.evict(num_blocks - pool.num_free_blocks)
        return pool.can_allocate(num_blocks)

    def _youngest_plain(self) -> Sequence | None:
        plain = [s for s in self.running if s.is_plain]
        return max(plain, key=lambda s: s.seq_id) if plain else None

    def _preempt(self, seq: Sequence, plan: _Plan) -> None:
        """Free a running plain sequence's blocks; it waits at the front to recompute them."""
        plan.remove(seq)
        self.running.remove(seq)
        self._reserved.pop(seq.seq_id, None)
        self._drop_cache(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _next_waiting(self) -> tuple[Sequence, Sequence] | None:
        """(the sequence to admit next, the oldest one that could start now), or None."""
        ready = [s for s in self.waiting if s.parent is None or s.parent.compressed][:MATCH_WINDOW]
        if not ready:
            return None  # their contexts are not ready yet
        oldest = ready[0]
        if self.prefix is None or oldest.num_skipped >= MAX_SKIPS:
            return oldest, oldest
        return max(ready, key=self._cached_len), oldest  # the first of equals: the oldest

    def _cached_len(self, seq: Sequence) -> int:
        """Tokens the prefix cache would give `seq` now (0 if it takes no part)."""
        assert self.prefix is not None
        seen = self._peeks.get(seq.seq_id)
        if seen is not None and seen[0] == self.prefix.version:
            return seen[1]
        key = seq.prefix_key()
        num_tokens = self.prefix.peek(key) if key is not None else 0
        self._peeks[seq.seq_id] = (self.prefix.version, num_tokens)
        return num_tokens

    def _try_admit(self, seq: Sequence, oldest: Sequence, plan: _Plan) -> bool:
        """Admit `seq` and plan its first chunk if both fit; otherwise change nothing."""
        if seq.parent is not None and not self._make_room(plan.num_blocks + fork_blocks(self.cache, seq)):
            return False
        self._attach(seq, self._unpromised_blocks(plan))
        assert seq.kv is not None
        reserve = self.reserve_blocks(seq)
        locked = self.prefix.num_locked_blocks if self.prefix is not None else 0
        n = self._chunk(seq, self.config.max_step_tokens - plan.num_tokens, first=not plan.items)
        need = self.cache.blocks_needed(seq.kv, n)
        fits = sum(self._reserved.values()) + locked + reserve <= self.cache.pool.num_blocks
        if not (fits and self._make_room(plan.num_blocks + need + press_blocks(self.cache, seq, n))):
            self._drop_cache(seq)
            return False
        if seq is not oldest:
            oldest.num_skipped += 1
        self.waiting.remove(seq)
        self._reserved[seq.seq_id] = reserve
        seq.status = Status.RUNNING
        self.running.append(seq)
        if n:
            plan.items.append((seq, n, need))
        if seq.compressed:  # a kept compressed context was attached
            self.on_compressed(seq)
        return True

    def _unpromised_blocks(self, plan: _Plan) -> int:
        """Free blocks that neither this step's plan nor any admitted sequence's reservation counts on."""
        pool = self.cache.pool
        locked = self.prefix.num_locked_blocks if self.prefix is not None else 0
        return max(
            0,
            min(
                pool.num_free_blocks - plan.num_blocks,
                pool.num_blocks - sum(self._reserved.values()) - locked,
            ),
        )

    def _attach(self, seq: Sequence, max_load_blocks: int | None = None) -> None:
        """Give a sequence being admitted its cache: a fork, what the prefix cache holds for it, or empty.

        Blocks loaded from storage tiers for it take at most `max_load_blocks`
        free blocks, so that blocks promised to running sequences stay free.
        """
        self._peeks.pop(seq.seq_id, None)
        if seq.parent is not None:
            assert seq.parent.kv is not None
            seq.kv, seq.num_computed = self.cache.fork(seq.parent.kv), seq.parent.num_computed
            return
        key = seq.prefix_key() if self.prefix is not None else None
        hit = None
        if self.prefix is not None and key is not None:
            hit = self.prefix.attach(seq.seq_id, key, max_load_blocks)
        if hit is None:
            seq.kv, seq.num_computed = self.cache.new_sequence(), 0
            return
        seq.kv, seq.num_computed = hit
        seq.num_cached_tokens = hit.num_tokens
        if seq.press is not None:
            seq.compressed = True  # a kept compressed context: neither prefill nor press for it

    def _free_cache(self, seq: Sequence, keep: bool = True) -> None:
        """Give back `seq`'s blocks (with `keep`, its full ones into the prefix cache, if it takes part)."""
        assert seq.kv is not None
        if self.prefix is not None and seq.is_plain:
            key = seq.computed_key()
            self.prefix.detach(seq.seq_id, seq.kv, key if keep else PrefixKey([], key.salt))
        else:
            self.cache.free(seq.kv)

    def _drop_cache(self, seq: Sequence) -> None:
        """Free `seq`'s cache so that it starts again from nothing (or from a cached prefix)."""
        self._free_cache(seq)
        seq.kv = None
        seq.num_computed = 0
        if seq.press is not None:
            seq.compressed = False  # it may have come from a kept compressed context

    def _chunk(self, seq: Sequence, budget: int, first: bool) -> int:
        """Tokens `seq` computes this step; a context to compress goes in one piece."""
        remaining = seq.num_tokens - seq.num_computed
        if seq.awaits_compression:
            whole = seq.context_len - seq.num_computed
            return whole if whole <= budget or first else 0
        return max(0, min(remaining, budget))

    def on_computed(self, seq: Sequence, num_tokens: int) -> None:
        """Count `num_tokens` more tokens of `seq` as cached, by the step that just ran.

        A prompt just computed is published to the prefix cache, so that
        requests arriving while it decodes reuse it. A context just cached
        (and compressed, with a press: the runner ran it in that step) is
        ready: see `on_compressed`; a compressed context is also kept by the
        prefix cache for later requests with the same context and press.
        """
        was_prefilling = seq.is_prefilling
        seq.num_computed += num_tokens
        if was_prefilling and not seq.is_prefilling and self.prefix is not None and seq.is_plain:
            assert seq.kv is not None
            self.prefix.publish(seq.seq_id, seq.kv, seq.computed_key())
        ready = seq.num_computed == seq.context_len and (seq.press is not None or seq.is_context)
        if not ready or seq.compressed:
            return
        seq.compressed = True
        key = seq.prefix_key() if seq.reuses_compressed else None
        if self.prefix is not None and key is not None:
            assert seq.kv is not None
            self.prefix.keep_compressed(seq.kv, key)
        self.on_compressed(seq)

    def on_compressed(self, seq: Sequence) -> None:
        """Shrink `seq`'s reservation to its blocks plus its worst-case growth."""
        self._reserved[seq.seq_id] = compressed_blocks(self.cache, seq)
        if seq.is_context:
            self.running.remove(seq)
            self.contexts[seq.seq_id] = seq
            seq.status = Status.FINISHED
            seq.finish_reason = "context"

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished and give its blocks back at once (full ones to the prefix cache).

        `seq.kv_bytes` records what its blocks held, `seq.finish_time` when.
        """
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.RUNNING:
            self.running.remove(seq)
        self.contexts.pop(seq.seq_id, None)
        self._reserved.pop(seq.seq_id, None)
        self._peeks.pop(seq.seq_id, None)
        if seq.kv is not None:
            seq.kv_bytes = self.cache.bytes_held(seq.kv)
            # A request that failed may hold half-written or non-finite blocks: none is cached.
            self._free_cache(seq, keep=reason != "error")
        elif self.prefix is not None:
            self.prefix.cancel_prefetch(seq.seq_id)  # never admitted: drop what was read ahead for it
        seq.finish_time = time.perf_counter()
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def stats(self) -> dict[str, float]:
        """Gauges and counters for metrics: requests running and waiting, preemptions so far."""
        return {
            "requests_running": len(self.running),
            "requests_waiting": len(self.waiting),
            "preemptions_total": self.num_preemptions,
        }
