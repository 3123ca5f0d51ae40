"""The storage-tier contract: the `Tier` base, its counters, and the registry of tiers by name.

A tier maps string keys to opaque blobs (bytes). It knows nothing about
blocks, models or the codec: checking that a blob is intact and belongs to
the key it was read under is `cache/blob.py`'s job, done by the caller. Tiers
are registered by name ("host", "disk", "redis"), the names `CacheConfig`
uses; the implementations live in the sibling modules, and importing the
package `kvengine.cache.tiers` registers them all.

Every tier is safe to call from several threads (the prefix cache reads in a
background thread). No tier raises for a missing key, a full tier or an
unreachable server: it answers None or False and counts what happened.

This module holds no implementation and no stack of tiers (see `stack.py`).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from kvengine.errors import InvalidRequestError
from kvengine.registry import Registry


@dataclass
class TierStats:
    """Counters of one tier since it was made (never reset)."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    errors: int = 0  # I/O or network failures (each one also answers None or False)


class Tier(ABC):
    """A key -> blob store. The contract every tier keeps:

    - `get(key)`: the bytes last `put` under `key`, or None when the key is not
      there or the tier cannot be reached now. It never checks the bytes: a
      torn or corrupted blob is returned as it is, for the codec to reject.
    - `put(key, blob)`: store (or replace) `blob`; True if stored. False when
      it cannot be: larger than the tier's capacity, or the tier is down. May
      evict other keys to make room (counted in `stats.evictions`).
    - `contains(key)`: whether `get` would probably find it (no stats, no
      change of recency).
    - `delete(key)`: forget `key` if present; never fails.
    - `flush()`: make what was stored durable where that means something.
    - `close()`: release files and connections; the tier is not used after.
    - `bytes_used`: bytes this tier holds (or, for a shared server, stored
      from this process); `capacity_bytes`: its bound, None if not its own.

    No method raises for a missing key, lack of room or an unreachable
    backend. Every method may be called from any thread.
    """

    name: str = ""
    capacity_bytes: int | None = None

    def __init__(self) -> None:
        self.stats = TierStats()
        self._lock = threading.Lock()

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def put(self, key: str, blob: bytes) -> bool: ...

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @property
    @abstractmethod
    def bytes_used(self) -> int: ...

    def flush(self) -> None:  # noqa: B027 (an optional hook: most tiers have nothing to make durable)
        """Make stored blobs durable; nothing to do by default."""

    def close(self) -> None:  # noqa: B027 (an optional hook)
        """Release resources; nothing to do by default."""


TIERS: Registry[Tier] = Registry("storage tier", "tiers")


def make_tier(name: str, **kwargs: Any) -> Tier:
    """The tier registered as `name`, built with `kwargs`; InvalidRequestError names the known ones."""
    return TIERS.lookup(name)(**kwargs)


def check_capacity(capacity_bytes: int) -> int:
    """`capacity_bytes` itself if it is an int >= 0; InvalidRequestError otherwise."""
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
        raise InvalidRequestError(f"tier capacity_bytes must be an int >= 0, got {capacity_bytes!r}")
    return capacity_bytes
