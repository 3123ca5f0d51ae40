"""The Redis tier: blobs in a Redis server that several processes and hosts share.

The `redis` package is an optional extra (kvengine[redis]); it is imported
when a tier is made, so this module imports without it. Capacity and
eviction are the server's, not this module's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from kvengine.cache.tiers.base import TIERS, Tier
from kvengine.errors import InvalidRequestError, MissingDependencyError

log = logging.getLogger("kvengine.tiers")


@TIERS.register("redis")
class RedisTier(Tier):
    """Blobs in a Redis server that several kvengine processes (and hosts) share.

    Capacity is the server's (`maxmemory` and its eviction policy), so
    `capacity_bytes` is None and `bytes_used` counts only what this object
    stored and did not delete. With `ttl_s`, a blob expires `ttl_s` seconds
    after it was last stored or read.

    When the server cannot be reached (a connection error or a timeout after
    `socket_timeout_s`), the tier is *down*: one warning is logged, calls
    answer None/False at once without touching the network, and after
    `retry_interval_s` the next call pings the server; if it answers, the tier
    is up again (one info line) and the call goes on.
    """

    name = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        key_prefix: str = "kvengine:",
        socket_timeout_s: float = 0.5,
        retry_interval_s: float = 5.0,
        ttl_s: float | None = None,
    ) -> None:
        super().__init__()
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise MissingDependencyError(
                "the redis tier needs the redis package: pip install 'kvengine[redis]'"
            ) from None
        if socket_timeout_s <= 0 or retry_interval_s < 0 or (ttl_s is not None and ttl_s <= 0):
            raise InvalidRequestError(
                "redis tier: socket_timeout_s must be > 0, retry_interval_s >= 0 and ttl_s None or > 0"
            )
        self.url, self.key_prefix = url, key_prefix
        self.retry_interval_s = retry_interval_s
        self._ttl_ms = None if ttl_s is None else max(1, round(ttl_s * 1000))
        # The library's own retries (with backoff) would stall every call on a dead server.
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as e:
            raise InvalidRequestError(f"redis tier: bad url {url!r}: {e}") from None
        self._network_errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._redis_error = redis.RedisError
        self._sizes: dict[str, int] = {}  # what this object stored: the basis of bytes_used
        self._down = False  # True from a network failure until a ping succeeds
        self._retry_at = 0.0
        self._call(self._client.ping, None)  # learn now whether the server is there

    @property
    def available(self) -> bool:
        """False while the server is considered down (between a failure and a successful retry)."""
        with self._lock:
            return not self._down

    def _call(self, fn: Any, default: Any, *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)`, or `default` when the server is down or fails."""
        with self._lock:
            down, retry_due = self._down, time.monotonic() >= self._retry_at
        if down and not retry_due:
            return default
        try:
            if down:
                self._client.ping()
                with self._lock:
                    came_back, self._down = self._down, False
                if came_back:  # only the thread that saw it come back says so
                    log.info("redis tier %s is reachable again", self.url)
            return fn(*args, **kwargs)
        except self._network_errors as e:
            with self._lock:
                self.stats.errors += 1
                self._retry_at = time.monotonic() + self.retry_interval_s
                went_down, self._down = not self._down, True
            if went_down:
                log.warning(
                    "redis tier %s unreachable (%s); retrying every %.1f s",
                    self.url,
                    e,
                    self.retry_interval_s,
                )
            return default
        except self._redis_error as e:  # the server answered with an error (e.g. out of memory)
            with self._lock:
                self.stats.errors += 1
            log.debug("redis tier %s: %s", self.url, e)
            return default

    def get(self, key: str) -> bytes | None:
        full = self.key_prefix + key
        if self._ttl_ms is None:
            blob = self._call(self._client.get, None, full)
        else:
            blob = self._call(self._client.getex, None, full, px=self._ttl_ms)
        with self._lock:
            if blob is None:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
        return blob

    def put(self, key: str, blob: bytes) -> bool:
        stored = bool(self._call(self._client.set, False, self.key_prefix + key, blob, px=self._ttl_ms))
        if stored:
            with self._lock:
                self._sizes[key] = len(blob)
                self.stats.stores += 1
        return stored

    def contains(self, key: str) -> bool:
        return bool(self._call(self._client.exists, 0, self.key_prefix + key))

    def delete(self, key: str) -> None:
        self._call(self._client.delete, 0, self.key_prefix + key)
        with self._lock:
            self._sizes.pop(key, None)

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def close(self) -> None:
        with contextlib.suppress(self._redis_error):
            self._client.close()
