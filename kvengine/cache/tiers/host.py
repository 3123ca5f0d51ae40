"""The host tier: blobs in this process's memory, bounded in bytes, least recently used evicted first.

It is not shared between processes and does not survive a restart (see
`disk.py` and `redis_tier.py` for tiers that do).
"""

from __future__ import annotations

from collections import OrderedDict

from kvengine.cache.tiers.base import TIERS, Tier, check_capacity


@TIERS.register("host")
class HostTier(Tier):
    """Blobs in this process's memory, least recently used evicted first."""

    name = "host"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__()
        self._capacity = self.capacity_bytes = check_capacity(capacity_bytes)
        self._blobs: OrderedDict[str, bytes] = OrderedDict()  # oldest access first
        self._used = 0

    def get(self, key: str) -> bytes | None:
        with self._lock:
            blob = self._blobs.get(key)
            if blob is None:
                self.stats.misses += 1
                return None
            self._blobs.move_to_end(key)
            self.stats.hits += 1
            return blob

    def put(self, key: str, blob: bytes) -> bool:
        blob = bytes(blob)  # a caller's bytearray must not change under us
        with self._lock:
            if len(blob) > self._capacity:
                return False
            old = self._blobs.pop(key, None)
            self._used += len(blob) - (len(old) if old is not None else 0)
            self._blobs[key] = blob
            self.stats.stores += 1
            while self._used > self._capacity:
                _, evicted = self._blobs.popitem(last=False)
                self._used -= len(evicted)
                self.stats.evictions += 1
            return True

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._blobs

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._blobs.pop(key, None)
            if old is not None:
                self._used -= len(old)

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._used

    def close(self) -> None:
        with self._lock:
            self._blobs.clear()
            self._used = 0
