"""The prefix cache's door to the storage tiers: chunk keys, blobs of blocks, prefetch, writes.

The prefix cache caches whole blocks; a *chunk* is one block-aligned run of
`block_size` tokens in every (layer, kv-head) cell: the `(L, H_kv)` block ids
that are one value of the radix tree. Below the pool a chunk is one blob
(`cache/blob.py`: safetensors with an HMAC) in every tier of a `TierStack`
(`cache/tiers/`).

A chunk key is a chained hash: of the model, the block layout, the namespace
(tenant salt) and every token up to the chunk's end. Equal keys mean equal
keys and values, so any process with the same model may load the chunk.

Authentication. Every process of one deployment holds the same secret
(`CacheConfig.tier_secret`); whoever can write to Redis or the disk
directory but lacks it can neither name a chunk nor forge one:

- a blob's storage name is `<kind prefix>` + HMAC(secret, its logical name)
  (`storage_name`): the tiers never see a chunk key, and a name reveals
  nothing of the model, tenant or tokens;
- a blob is used only if its MAC holds under the secret and its metadata
  names the same model, layout and key.

Anything else is a fault: counted by kind (`tier_faults_corrupt_total`,
`tier_faults_unauthenticated_total`, `tier_faults_mismatch_total`),
discarded from the tiers, and the tokens computed again.

Threads. Reading a blob and checking it happens in a background thread
(`prefetch`, started when a request arrives, ahead of the prefill that needs
it); encoding and writing happen in another (`store`), after the blocks'
contents were copied out of the pool on the caller's thread. Neither thread
touches the pool.

Read-ahead. What `prefetch` reads waits in a staged store until its request
takes it (`fetch`) or lets it go (`release`: admitted, finished or aborted
while waiting); a chunk leaves the store when the last read-ahead that holds
it does. The store holds at most `MAX_STAGED` chunks: when full, the oldest
chunk another read-ahead holds makes room (that request reads it again when
admitted), so read-ahead never stops for good.

This module is not the tiers (cache/tiers/) nor the tree (cache/prefix.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kvengine.cache.blob import BlobError, KeyMismatchError, decode, encode
from kvengine.cache.pool import KVPool
from kvengine.cache.tiers import TierStack, make_tier
from kvengine.config import CacheConfig

log = logging.getLogger("kvengine.tiers")

KEY_VERSION = "kvengine-chunk-v1"
CHUNK_PREFIX = "kvengine:chunk:"
MAX_STAGED = 4096  # prefetched chunks waiting for their requests; more are read when needed


def make_tier_stack(config: CacheConfig) -> TierStack | None:
    """The tiers a `CacheConfig` names, fastest first; None without any."""
    options: dict[str, dict[str, Any]] = {
        "host": {"capacity_bytes": config.host_tier_bytes},
        "disk": {"directory": config.disk_tier_path, "capacity_bytes": config.disk_tier_bytes},
        "redis": {"url": config.redis_url},
    }
    names = config.tier_names
    return TierStack([make_tier(name, **options[name]) for name in names]) if names else None


class Prefetch:
    """The chunks read ahead for one request: `wait()` for the reads, `TierBridge.release` to let go.

    Its fields are the bridge's, changed under the bridge's lock.
    """

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.staged: set[str] = set()  # keys it staged or found staged (some may have left since)
        self.released = False
        self.future: Future[None] | None = None

    def wait(self) -> None:
        """Return once every read of this prefetch is done (or it was released before starting)."""
        if self.future is not None:
            with contextlib.suppress(CancelledError):
                self.future.result()


@dataclass
class _Staged:
    """A chunk read ahead, and the read-aheads that hold it."""

    tensors: dict[str, torch.Tensor]
    holders: set[Prefetch] = field(default_factory=set)


class TierBridge:
    """Moves chunks of a `KVPool` to and from a `TierStack`, authenticated by `secret`."""

    def __init__(
        self,
        stack: TierStack,
        pool: KVPool,
        model_name: str,
        num_layers: int,
        num_kv_heads: int,
        *,
        secret: bytes,
    ) -> None:
        self.stack = stack
        self.pool = pool
        self.cell_shape = (num_layers, num_kv_heads)
        layout = f"{num_layers}x{num_kv_heads}x{pool.block_size}x{pool.head_dim}:{pool.dtype}"
        self.meta = {"model": model_name, "layout": layout}
        self.counts: Counter[str] = Counter()
        self._secret = secret
        self._staged: OrderedDict[str, _Staged] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="kvengine-tier-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvengine-tier-write")

    # ---- keys ---------------------------------------------------------------

    def chunk_keys(self, namespace: Hashable, tokens: Sequence[int]) -> list[str]:
        """The key of each whole block of `tokens` (a tree key) in `namespace`."""
        bs = self.pool.block_size
        seed = repr((KEY_VERSION, self.meta["model"], self.meta["layout"], namespace))
        h = hashlib.sha256(seed.encode()).hexdigest()
        keys = []
        for start in range(0, len(tokens) - bs + 1, bs):
            chunk = ",".join(map(str, tokens[start : start + bs]))
            h = hashlib.sha256(f"{h}|{chunk}".encode()).hexdigest()
            keys.append(h)
        return keys

    def storage_name(self, name: str) -> str:
        """Where the tiers keep the blob of a logical `name` (`<kind prefix>:<key>`).

        The kind prefix (up to the last ":") stays readable; the rest is
        HMAC(secret, name), so a name reveals no key material and only a
        holder of the secret can tell which name a chunk would have.
        """
        kind = name[: name.rfind(":") + 1]
        return kind + hmac.new(self._secret, name.encode(), hashlib.sha256).hexdigest()

    # ---- reading ------------------------------------------------------------

    def prefetch(self, keys: list[str]) -> Prefetch:
        """Start reading and checking the chunks `keys` (in order, up to the first miss).

        What it reads stays staged for `fetch` until `release(handle)`: the
        caller must release every handle (its request admitted, finished or
        aborted).
        """
        handle = Prefetch(keys)
        handle.future = self._reader.submit(self._stage, handle)
        return handle

    def _stage(self, handle: Prefetch) -> None:
        for key in handle.keys:
            with self._lock:
                if handle.released:
                    return
                entry = self._staged.get(key)
                if entry is not None:
                    entry.holders.add(handle)
                    handle.staged.add(key)
                    continue
                if not self._make_room_locked(handle):
                    return  # the store is full of its own chunks: the rest are read at admission
            tensors = self._read(key)
            if tensors is None:
                return
            with self._lock:
                if handle.released or not self._make_room_locked(handle):
                    return  # its request left while the chunk was read, or the store is all its own
                self._staged[key] = _Staged(tensors, {handle})
                handle.staged.add(key)

    def _make_room_locked(self, handle: Prefetch) -> bool:
        """Below MAX_STAGED chunks, after dropping the oldest others hold; False if only `handle`'s are left."""
        while len(self._staged) >= MAX_STAGED:
            oldest = next(iter(self._staged.values()))
            if handle in oldest.holders:
                return False
            self._staged.popitem(last=False)
            self.counts["tier_staged_dropped_total"] += 1
        return True

    def release(self, handle: Prefetch) -> None:
        """Let go of what `handle` read ahead: chunks no other read-ahead holds are dropped now.

        Reads it has not made yet are not made. Safe to call more than once.
        """
        with self._lock:
            handle.released = True
            for key in handle.staged:
                entry = self._staged.get(key)
                if entry is not None:
                    entry.holders.discard(handle)
                    if not entry.holders:
                        del self._staged[key]
            handle.staged.clear()
        if handle.future is not None:
            handle.future.cancel()  # still queued: never started

    def drain(self) -> None:
        """Wait until every read-ahead started so far has finished."""
        self._reader.submit(lambda: None).result()

    def fetch(self, keys: list[str]) -> list[dict[str, torch.Tensor]]:
        """The checked contents of the longest run of `keys` found, prefetched or read now.

        A chunk taken from the staged store leaves it.
        """
        found = []
        for key in keys:
            with self._lock:
                entry = self._staged.pop(key, None)
            tensors = entry.tensors if entry is not None else self._read(key)
            if tensors is None:
                break
            found.append(tensors)
        return found

    def _read(self, key: str) -> dict[str, torch.Tensor] | None:
        tensors = self.read_blob(CHUNK_PREFIX + key, {"key": key})
        if tensors is None:
            return None
        expected = (*self.cell_shape, self.pool.block_size, self.pool.head_dim)
        for name in ("k", "v"):
            t = tensors.get(name)
            if t is None or tuple(t.shape) != expected or t.dtype != self.pool.dtype:
                self.reject(CHUNK_PREFIX + key, KeyMismatchError(f"tensor {name!r} of the wrong shape"))
                return None
        self._count("tier_loaded_chunks_total")
        return tensors

    def read_blob(self, name: str, meta: dict[str, str]) -> dict[str, torch.Tensor] | None:
        """The checked tensors of the logical `name`, or None (missing, or a fault: counted)."""
        found = self.stack.get(self.storage_name(name))
        if found is None:
            self._count("tier_misses_total")
            return None
        try:
            return decode(found[0], {**self.meta, **meta}, secret=self._secret)
        except BlobError as exc:
            self.reject(name, exc)
            return None

    def reject(self, name: str, exc: BlobError) -> None:
        """Count a blob (of the logical `name`) that failed its checks and remove it from every tier."""
        self._count(f"tier_faults_{exc.kind}_total")
        storage_name = self.storage_name(name)
        log.warning("tier blob %s rejected (%s); it will be computed again", storage_name, exc)
        self.stack.discard(storage_name)

    def install(self, chunks: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Copy fetched chunks into new pool blocks; returns each chunk's `(L, H_kv)` block ids.

        The caller owns the one reference of every new block. Raises
        OutOfBlocksError (and allocates nothing) when the pool is short.
        """
        cells = self.cell_shape[0] * self.cell_shape[1]
        ids = self.pool.allocate(cells * len(chunks)).view(len(chunks), *self.cell_shape)
        for block_ids, chunk in zip(ids, chunks, strict=True):
            self.pool.write_blocks(block_ids, chunk["k"], chunk["v"])
        return list(ids)

    # ---- writing ------------------------------------------------------------

    def store(self, keys: list[str], values: list[torch.Tensor]) -> None:
        """Write chunks (keys and their `(L, H_kv)` block ids) to every tier, in the background.

        The blocks' contents are copied now, so the blocks may be freed as soon
        as this returns.
        """
        if not keys:
            return
        k, v = self.pool.read_blocks(torch.stack(values))  # (n, L, H_kv, block_size, D)
        self._writer.submit(self._write, keys, k, v)

    def _write(self, keys: list[str], k: torch.Tensor, v: torch.Tensor) -> None:
        for i, key in enumerate(keys):
            tensors = {"k": k[i].contiguous(), "v": v[i].contiguous()}
            blob = encode({**self.meta, "key": key}, tensors, secret=self._secret)
            if self.stack.put(self.storage_name(CHUNK_PREFIX + key), blob):
                self._count("tier_stored_chunks_total")

    def store_blob(self, name: str, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        """Write tensors (already copied out of the pool) under the logical `name`, in the background."""

        def write() -> None:
            blob = encode({**self.meta, **meta}, tensors, secret=self._secret)
            if self.stack.put(self.storage_name(name), blob):
                self._count("tier_stored_blobs_total")

        self._writer.submit(write)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    # ---- lifetime -----------------------------------------------------------

    def flush(self) -> None:
        """Wait until every write so far is in the tiers, and make them durable."""
        self._writer.submit(lambda: None).result()
        self.stack.flush()

    def close(self) -> None:
        self.flush()
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self.stack.close()

    def stats(self) -> dict[str, float]:
        """Counters (`*_total`) of chunks loaded, stored, missed, rejected by kind; staged chunks now."""
        with self._lock:
            stats: dict[str, float] = {**self.counts, "tier_staged_chunks": len(self._staged)}
        for name, value in self.stack.stats().items():
            stats[f"tier_{name}_total"] = value
        return stats
