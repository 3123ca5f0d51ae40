"""Frozen configuration dataclasses, one per subsystem.

This is the only module that reads the environment: `KVENGINE_CACHE_DIR`
(where converted model weights are kept) and `KVENGINE_TIER_SECRET` (what
authenticates tier blobs) are resolved here and nowhere else.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from kvengine.cache.policy import online_policy_names
from kvengine.errors import InvalidRequestError

DEFAULT_MODEL = "smollm2-135m"
TIER_NAMES = ("host", "disk", "redis")  # the storage tiers of cache/tiers/, fastest first
TIER_SECRET_ENV = "KVENGINE_TIER_SECRET"
MIN_TIER_SECRET_BYTES = 16
# Devices a model may run on: "auto" (a CUDA GPU if torch sees one, else the CPU) or a torch device name.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps, xpu, xpu:N"


def default_cache_dir() -> Path:
    """Directory for converted weights: `$KVENGINE_CACHE_DIR`, else `$XDG_CACHE_HOME/kvengine`."""
    explicit = os.environ.get("KVENGINE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kvengine"


WEIGHTS_CHOICES = ("model", "int8", "int4")  # how linear layers hold their weights (ModelConfig.weights)


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load, where converted weights are cached, in what precision and on which device."""

    name: str = DEFAULT_MODEL
    cache_dir: Path | None = None  # None: default_cache_dir()
    dtype: str = "auto"  # "auto": bfloat16 where the hardware computes it natively, else float32
    device: str = "auto"  # "auto": a CUDA GPU if torch sees one, else the CPU (models/device.py)
    weights: str = "model"  # "model": as loaded, in `dtype`; "int8" / "int4": weight-only (engine/weights.py)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidRequestError(
                f"dtype must be one of auto, float32, bfloat16, float16, got {self.dtype!r}"
            )
        check_device_name(self.device)
        if self.weights not in WEIGHTS_CHOICES:
            raise InvalidRequestError(
                f"weights must be one of {', '.join(WEIGHTS_CHOICES)}, got {self.weights!r}"
            )


def check_device_name(name: str) -> None:
    """Raise InvalidRequestError unless `name` is a device kvengine knows (`DEVICE_CHOICES`).

    Whether this machine has that device is checked at load (`models.device.resolve_device`).
    """
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise InvalidRequestError(f"device must be one of {DEVICE_CHOICES}, got {name!r}")


@dataclass(frozen=True)
class CacheConfig:
    """Size and shape of the block pool that owns all KV memory.

    A block holds `block_size` tokens of one (layer, kv-head). The pool holds
    `max_kv_bytes` of keys and values, rounded down to whole blocks. With
    `kv_bits`, full blocks are stored packed (KIVI); `max_kv_bytes` then buys
    packed blocks, and full-precision blocks for the tokens of one step and
    each sequence's partly filled last blocks come on top. `kv_rotate`
    rotates keys and values by a fixed randomized Hadamard transform before
    they are packed (QuaRot / TurboQuant; needs a power-of-two head_dim), and
    `select_blocks` (Quest, engine/selection.py) has each head read only
    that fraction of its blocks per decode step, the highest by an upper
    bound of their keys' scores, plus a sink block and the two most recent;
    the whole cache is kept. `kv_key_groups` "token" groups keys per token instead of per channel
    (KIVI's); both are storage choices of the packed blocks (`cache/quant.py`).

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

    Tier blobs are authenticated with a secret (`tier_secret()`): a blob
    that Redis or disk holds is used only if it was written with the same
    one, so whoever can write to the store but lacks the secret cannot plant
    keys and values. Processes of one user on one machine share a default
    secret file; several hosts sharing a Redis must be given the same secret
    (`tier_secret_file`, or `$KVENGINE_TIER_SECRET`), or they never hit each
    other's blobs (counted as `tier_faults_unauthenticated_total`).
    """

    block_size: int = 16
    max_kv_bytes: int = 2 * 2**30
    kv_bits: int = 0  # 0: keys and values in the model's dtype; 2, 3, 4 or 8: packed KIVI blocks
    kv_rotate: bool = False  # rotate keys and values (randomized Hadamard) before packing them
    kv_key_groups: str = "channel"  # packed keys grouped per "channel" (KIVI) or per "token"
    select_blocks: float = 0.0  # Quest: each head reads this fraction of its blocks per decode step (0: all)
    prefix_cache: bool = False
    eviction_policy: str = "lru"
    tiers: str = ""  # e.g. "host,disk,redis"; needs prefix_cache
    tier_write: str = "through"  # "through" or "back"
    host_tier_bytes: int = 4 * 2**30
    disk_tier_dir: str = ""  # "": <cache dir>/kv-blocks
    disk_tier_bytes: int = 16 * 2**30
    redis_url: str = "redis://127.0.0.1:6379/0"
    tier_secret_file: str = ""  # "": $KVENGINE_TIER_SECRET, else <cache dir>/tier-secret

    @property
    def tier_names(self) -> list[str]:
        return [t.strip() for t in self.tiers.split(",") if t.strip()]

    @property
    def disk_tier_path(self) -> Path:
        return (
            Path(self.disk_tier_dir).expanduser() if self.disk_tier_dir else default_cache_dir() / "kv-blocks"
        )

    def tier_secret(self) -> bytes:
        """The secret that authenticates tier blobs; InvalidRequestError if it is unusable.

        In order: the contents of `tier_secret_file` (surrounding whitespace
        stripped); else `$KVENGINE_TIER_SECRET`; else `<cache dir>/tier-secret`,
        created once (32 random bytes as hex, mode 0600) by the first process
        that needs it and reused by every later one. At least
        `MIN_TIER_SECRET_BYTES` bytes. Read when tiers are built, never stored
        in the config (which is printed and logged).
        """
        if self.tier_secret_file:
            return _read_secret(Path(self.tier_secret_file).expanduser())
        from_env = os.environ.get(TIER_SECRET_ENV)
        if from_env is not None:
            return _check_secret(from_env.strip().encode(), f"${TIER_SECRET_ENV}")
        return _default_tier_secret(default_cache_dir() / "tier-secret")

    def __post_init__(self) -> None:
        if self.kv_bits not in (0, 2, 3, 4, 8):
            raise InvalidRequestError(f"kv_bits must be 0 (off), 2, 3, 4 or 8, got {self.kv_bits}")
        if self.kv_key_groups not in ("channel", "token"):
            raise InvalidRequestError(
                f"kv_key_groups must be 'channel' or 'token', got {self.kv_key_groups!r}"
            )
        if (self.kv_rotate or self.kv_key_groups != "channel") and not self.kv_bits:
            raise InvalidRequestError("kv_rotate and kv_key_groups shape packed blocks: set kv_bits too")
        if not 0.0 <= self.select_blocks <= 1.0:
            raise InvalidRequestError(f"select_blocks must be in [0, 1], got {self.select_blocks}")
        if self.select_blocks and self.kv_bits:
            raise InvalidRequestError(
                "select_blocks (quest) does not run over packed blocks yet: use kv_bits=0"
            )
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


def _check_secret(secret: bytes, source: str) -> bytes:
    if len(secret) < MIN_TIER_SECRET_BYTES:
        raise InvalidRequestError(
            f"the tier secret in {source} has {len(secret)} bytes; it needs at least {MIN_TIER_SECRET_BYTES}"
        )
    return secret


def _read_secret(path: Path) -> bytes:
    try:
        return _check_secret(path.read_bytes().strip(), str(path))
    except OSError as e:
        raise InvalidRequestError(f"cannot read the tier secret file {str(path)!r}: {e.strerror}") from None


def _default_tier_secret(path: Path) -> bytes:
    """The secret in `path`, which is created first if missing (atomically: racing processes agree)."""
    if not path.exists():
        # Written whole to a private temporary file, then linked into place: a
        # reader never sees a partial secret, and of two processes starting at
        # once the second link fails and both use the first one's.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError as e:
            raise InvalidRequestError(
                f"cannot create the tier secret file {str(path)!r} ({e.strerror}); "
                f"give one with tier_secret_file or ${TIER_SECRET_ENV}"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
    return _read_secret(path)


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
    # Seconds. A connection must send a request's headers within `header_timeout_s` of being
    # opened (or of its previous response), and the whole body within `body_timeout_s` after
    # them; slower clients get 408 and are cut, so slow senders cannot hold connections.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # On SIGTERM or Ctrl-C: requests in flight get this long to finish, then are ended.
    shutdown_grace_s: float = 30.0

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
        for name in ("header_timeout_s", "body_timeout_s", "shutdown_grace_s"):
            if not getattr(self, name) > 0:
                raise InvalidRequestError(f"{name} must be > 0, got {getattr(self, name)}")
