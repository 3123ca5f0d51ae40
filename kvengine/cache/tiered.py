"""The prefix cache's door to the storage tiers: chunk keys, blobs of blocks, prefetch, writes.

The prefix cache caches whole blocks; a *chunk* is one block-aligned run of
`block_size` tokens in every (layer, kv-head) cell: the `(L, H_kv)` block ids
that are one value of the radix tree. Below the pool a chunk is one blob
(`cache/blob.py`: safetensors with a content hash) in every tier of a
`TierStack` (`cache/tiers/`), stored under its chunk key.

A chunk key is a chained hash: of the model, the block layout, the namespace
(tenant salt) and every token up to the chunk's end. Equal keys mean equal
keys and values, so any process with the same model may load the chunk; a
blob is used only if its metadata names the same model, layout and key and
its content hash holds. Anything else is a fault: counted, discarded from
the tiers, and the tokens computed again.

Threads. Reading a blob and checking it happens in a background thread
(`prefetch`, started when a request arrives, ahead of the prefill that needs
it); encoding and writing happen in another (`store`), after the blocks'
contents were copied out of the pool on the caller's thread. Neither thread
touches the pool.

This module is not the tiers (cache/tiers/) nor the tree (cache/prefix.py).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from kvengine.cache.blob import BlobError, KeyMismatchError, decode, encode
from kvengine.cache.pool import KVPool
from kvengine.cache.tiers import TierStack, make_tier
from kvengine.config import CacheConfig

log = logging.getLogger("kvengine.tiers")

KEY_VERSION = "kvengine-chunk-v1"
MAX_STAGED = 4096  # prefetched chunks waiting for their request; more are read when needed


def make_tier_stack(config: CacheConfig) -> TierStack | None:
    """The tiers a `CacheConfig` names, fastest first; None without any."""
    options: dict[str, dict[str, Any]] = {
        "host": {"capacity_bytes": config.host_tier_bytes},
        "disk": {"directory": config.disk_tier_path, "capacity_bytes": config.disk_tier_bytes},
        "redis": {"url": config.redis_url},
    }
    names = config.tier_names
    return TierStack([make_tier(name, **options[name]) for name in names]) if names else None


class TierBridge:
    """Moves chunks of a `KVPool` to and from a `TierStack`."""

    def __init__(
        self, stack: TierStack, pool: KVPool, model_name: str, num_layers: int, num_kv_heads: int
    ) -> None:
        self.stack = stack
        self.pool = pool
        self.cell_shape = (num_layers, num_kv_heads)
        layout = f"{num_layers}x{num_kv_heads}x{pool.block_size}x{pool.head_dim}:{pool.dtype}"
        self.meta = {"model": model_name, "layout": layout}
        self.counts: Counter[str] = Counter()
        self._staged: dict[str, dict[str, torch.Tensor]] = {}
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

    @staticmethod
    def _storage_key(key: str) -> str:
        return f"kvengine:chunk:{key}"

    # ---- reading ------------------------------------------------------------

    def prefetch(self, keys: list[str]) -> Future[None]:
        """Start reading and checking the chunks `keys` (in order, up to the first miss)."""
        return self._reader.submit(self._stage, keys)

    def _stage(self, keys: list[str]) -> None:
        for key in keys:
            with self._lock:
                if key in self._staged:
                    continue
                if len(self._staged) >= MAX_STAGED:
                    return
            tensors = self._read(key)
            if tensors is None:
                return
            with self._lock:
                self._staged[key] = tensors

    def fetch(self, keys: list[str]) -> list[dict[str, torch.Tensor]]:
        """The checked contents of the longest run of `keys` found, prefetched or read now."""
        found = []
        for key in keys:
            with self._lock:
                tensors = self._staged.pop(key, None)
            if tensors is None:
                tensors = self._read(key)
            if tensors is None:
                break
            found.append(tensors)
        return found

    def unstage(self, keys: list[str]) -> None:
        """Forget prefetched chunks nobody took (their request was served from the pool)."""
        with self._lock:
            for key in keys:
                self._staged.pop(key, None)

    def _read(self, key: str) -> dict[str, torch.Tensor] | None:
        tensors = self.read_blob(self._storage_key(key), {"key": key})
        if tensors is None:
            return None
        expected = (*self.cell_shape, self.pool.block_size, self.pool.head_dim)
        for name in ("k", "v"):
            t = tensors.get(name)
            if t is None or tuple(t.shape) != expected or t.dtype != self.pool.dtype:
                self.reject(self._storage_key(key), KeyMismatchError(f"tensor {name!r} of the wrong shape"))
                return None
        self._count("tier_loaded_chunks_total")
        return tensors

    def read_blob(self, storage_key: str, meta: dict[str, str]) -> dict[str, torch.Tensor] | None:
        """The checked tensors stored under `storage_key`, or None (missing, or a fault: counted)."""
        found = self.stack.get(storage_key)
        if found is None:
            self._count("tier_misses_total")
            return None
        try:
            return decode(found[0], {**self.meta, **meta})
        except BlobError as exc:
            self.reject(storage_key, exc)
            return None

    def reject(self, storage_key: str, exc: BlobError) -> None:
        """Count a blob that failed its checks and remove it from every tier."""
        self._count(f"tier_faults_{exc.kind}_total")
        log.warning("tier blob %s rejected (%s); it will be computed again", storage_key, exc)
        self.stack.discard(storage_key)

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
            blob = encode({**self.meta, "key": key}, {"k": k[i].contiguous(), "v": v[i].contiguous()})
            if self.stack.put(self._storage_key(key), blob):
                self._count("tier_stored_chunks_total")

    def store_blob(self, storage_key: str, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        """Write tensors (already copied out of the pool) to every tier, in the background."""

        def write() -> None:
            if self.stack.put(storage_key, encode({**self.meta, **meta}, tensors)):
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
        with self._lock:
            stats: dict[str, float] = dict(self.counts)
        for name, value in self.stack.stats().items():
            stats[f"tier_{name}_total"] = value
        return stats
