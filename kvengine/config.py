"""Frozen configuration dataclasses, one per subsystem.

This is the only module that reads the environment: `KVENGINE_CACHE_DIR`
(where converted model weights are kept) is resolved here and nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvengine.cache.policy import online_policy_names
from kvengine.errors import InvalidRequestError

DEFAULT_MODEL = "smollm2-135m"
TIER_NAMES = ("host", "disk", "redis")  # the storage tiers of cache/tiers/, fastest first


def default_cache_dir() -> Path:
    """Directory for converted weights: `$KVENGINE_CACHE_DIR`, else `$XDG_CACHE_HOME/kvengine`."""
    explicit = os.environ.get("KVENGINE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kvengine"


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and where converted weights are cached."""

    name: str = DEFAULT_MODEL
    cache_dir: Path | None = None  # None: default_cache_dir()
    dtype: str = "auto"  # "auto": bfloat16 where the hardware computes it natively, else float32

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidRequestError(
                f"dtype must be one of auto, float32, bfloat16, float16, got {self.dtype!r}"
            )


@dataclass(frozen=True)
class CacheConfig:
    """Size and shape of the block pool that owns all KV memory.

    A block holds `block_size` tokens of one (layer, kv-head). The pool holds
    `max_kv_bytes` of keys and values, rounded down to whole blocks. With
    `kv_bits`, full blocks are stored packed (KIVI); `max_kv_bytes` then buys
    packed blocks, and full-precision blocks for the tokens of one step and
    each sequence's partly filled last blocks come on top.

    With `prefix_cache`, the full blocks of finished requests stay in a radix
    tree and later requests with the same prefix (same model and tenant salt,
    no press) reuse them; `eviction_policy` (a registered policy name) picks
    what goes when the pool is short. A context compressed by a press is kept
    too, whole, and reused by the next request with the same context, press
    and salt.

    `tiers` (comma-separated, fastest first: "host", "disk", "redis") puts
    storage below the pool: cached blocks are written there when cached
    (`tier_write="through"`) or when evicted from the pool ("back"), and
    loaded back on a prefix match. The disk tier persists across restarts;
    several processes may share one Redis.
    """

    block_size: int = 16
    max_kv_bytes: int = 2 * 2**30
    kv_bits: int = 0  # 0: keys and values in the model's dtype; 2, 4 or 8: packed KIVI blocks
    prefix_cache: bool = False
    eviction_policy: str = "lru"
    tiers: str = ""  # e.g. "host,disk,redis"; needs prefix_cache
    tier_write: str = "through"  # "through" or "back"
    host_tier_bytes: int = 4 * 2**30
    disk_tier_dir: str = ""  # "": <cache dir>/kv-blocks
    disk_tier_bytes: int = 16 * 2**30
    redis_url: str = "redis://127.0.0.1:6379/0"

    @property
    def tier_names(self) -> list[str]:
        return [t.strip() for t in self.tiers.split(",") if t.strip()]

    @property
    def disk_tier_path(self) -> Path:
        return (
            Path(self.disk_tier_dir).expanduser() if self.disk_tier_dir else default_cache_dir() / "kv-blocks"
        )

    def __post_init__(self) -> None:
        if self.kv_bits not in (0, 2, 4, 8):
            raise InvalidRequestError(f"kv_bits must be 0 (off), 2, 4 or 8, got {self.kv_bits}")
        if self.block_size < 1:
            raise InvalidRequestError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_kv_bytes < 1:
            raise InvalidRequestError(f"max_kv_bytes must be >= 1, got {self.max_kv_bytes}")
        if self.eviction_policy not in online_policy_names():
            raise InvalidRequestError(
                f"unknown eviction policy {self.eviction_policy!r}; "
                f"known policies: {', '.join(online_policy_names())}"
            )
        if self.prefix_cache and self.kv_bits:
            raise InvalidRequestError("the prefix cache does not hold packed KIVI blocks yet; use kv_bits=0")
        unknown = [t for t in self.tier_names if t not in TIER_NAMES]
        if unknown:
            raise InvalidRequestError(f"unknown tier {unknown[0]!r}; known tiers: {', '.join(TIER_NAMES)}")
        if len(set(self.tier_names)) != len(self.tier_names):
            raise InvalidRequestError(f"a tier is named twice in tiers={self.tiers!r}")
        if self.tier_names and not self.prefix_cache:
            raise InvalidRequestError("storage tiers sit below the prefix cache: turn prefix_cache on")
        if self.tier_write not in ("through", "back"):
            raise InvalidRequestError(f"tier_write must be 'through' or 'back', got {self.tier_write!r}")
        for name in ("host_tier_bytes", "disk_tier_bytes"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SchedulerConfig:
    """How much work one forward pass may carry."""

    max_num_seqs: int = 64  # sequences running at once
    max_step_tokens: int = 2048  # prefill + decode tokens packed into one forward

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise InvalidRequestError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_step_tokens < 1:
            raise InvalidRequestError(f"max_step_tokens must be >= 1, got {self.max_step_tokens}")


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP server: where it listens, who may call it, and the limits on each request.

    `api_keys` empty means no authentication; otherwise each request must send
    one of them as `Authorization: Bearer KEY`, and each key is its own tenant
    of the prefix cache. `public_prefixes` are texts (a shared system prompt)
    whose cached blocks every tenant may reuse, as a chat's system message or
    as the start of a plain prompt; they need the prefix cache.

    GET /metrics (Prometheus) and GET /health are always served and need no
    key, as is common for scrapers and probes: they give aggregate counts
    and latencies, never a request's content. Keep the port off untrusted
    networks, or filter /metrics in front of it, if even that is too much.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_prompt_tokens: int = 8192
    max_tokens_limit: int = 4096  # the largest `max_tokens` a request may ask for
    max_concurrent_requests: int = 256  # requests in flight at once; more are answered 429
    max_body_bytes: int = 1 << 20
    public_prefixes: tuple[str, ...] = ()
    # Stop strings are searched at every token: their number and length bound that work.
    max_stop_strings: int = 64
    max_stop_string_chars: int = 1024

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidRequestError(f"port must be in [0, 65535], got {self.port}")
        if any(not isinstance(k, str) or not k.strip() for k in self.api_keys):
            raise InvalidRequestError("api_keys must be non-empty strings")
        if any(not isinstance(p, str) or not p for p in self.public_prefixes):
            raise InvalidRequestError("public_prefixes must be non-empty strings")
        limits = (
            "max_prompt_tokens",
            "max_tokens_limit",
            "max_concurrent_requests",
            "max_body_bytes",
            "max_stop_strings",
            "max_stop_string_chars",
        )
        for name in limits:
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")
