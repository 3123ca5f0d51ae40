"""A stack of storage tiers, fastest first: reads search down and promote hits, writes go to all.

It knows nothing about which tiers it holds, nor about blobs' contents
(checking them is `cache/blob.py`'s job, done by the caller).
"""

from __future__ import annotations

from dataclasses import asdict

from kvengine.cache.tiers.base import Tier
from kvengine.errors import InvalidRequestError


class TierStack:
    """Tiers ordered fastest first: reads search down and promote, writes go to every tier."""

    def __init__(self, tiers: list[Tier]) -> None:
        names = [t.name for t in tiers]
        if not tiers or len(set(names)) != len(names):
            raise InvalidRequestError(f"a tier stack needs one or more tiers of distinct names, got {names}")
        self.tiers = list(tiers)

    def get(self, key: str) -> tuple[bytes, str] | None:
        """The blob of the fastest tier that has `key`, and that tier's name; None if none has it.

        A hit below the top is copied into every tier above it, so the next
        read is served from the top.
        """
        for i, tier in enumerate(self.tiers):
            blob = tier.get(key)
            if blob is not None:
                for upper in self.tiers[:i]:
                    upper.put(key, blob)
                return blob, tier.name
        return None

    def put(self, key: str, blob: bytes) -> bool:
        """Store `blob` in every tier; True if at least one took it."""
        stored = [tier.put(key, blob) for tier in self.tiers]
        return any(stored)

    def discard(self, key: str) -> None:
        """Delete `key` from every tier (a blob that failed its check must not be served again)."""
        for tier in self.tiers:
            tier.delete(key)

    def flush(self) -> None:
        for tier in self.tiers:
            tier.flush()

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def stats(self) -> dict[str, int]:
        """Every tier's counters, flattened: {"host_hits": .., "disk_errors": .., ...}."""
        return {f"{t.name}_{k}": v for t in self.tiers for k, v in asdict(t.stats).items()}
