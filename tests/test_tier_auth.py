"""Tier blobs are authenticated: a writer without the secret cannot name a chunk nor plant one.

The attack (issue 14, item 3): someone who can write to the disk directory
or to Redis, but is not an engine process, takes tenant B's blobs (readable
there) and stores their keys and values under tenant A's chunks, in the
current format under a secret of their own or in the old format whose plain
SHA-256 anyone can recompute. The reference is a cold run: A's greedy output
must equal it, every forged blob read must be counted
(`tier_faults_unauthenticated_total`), deleted and computed again. A control
plants the same blobs *with* the secret and shows they would be used and
change the output, so the test cannot pass because the forgery was inert.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import tiny_model
from redis_server import RedisServer, redis_server  # noqa: F401 (a fixture)
from test_engine import random_prompt
from test_tiers_engine import generate, hit_len, reference, tier_engine

from kvengine.cache.blob import decode, encode
from kvengine.cache.tiered import CHUNK_PREFIX, TierBridge
from kvengine.cache.tiers import DiskTier, RedisTier, Tier
from kvengine.config import TIER_SECRET_ENV, CacheConfig
from kvengine.engine.engine import Engine
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel

PROMPT_LEN = 48


def _secret_file(path: Path, secret: bytes = b"0123456789abcdef-the-test-secret") -> str:
    path.write_bytes(secret + b"\n")
    return str(path)


def _bridge(engine: Engine) -> TierBridge:
    assert engine.prefix is not None and engine.prefix.tiers is not None
    return engine.prefix.tiers


def _chunk_keys(engine: Engine, prompt: list[int], salt: str) -> list[str]:
    assert engine.prefix is not None
    namespace, tokens = engine.prefix.keys.tree_key(prompt, salt)
    return _bridge(engine).chunk_keys(namespace, tokens)


def _v1_blob(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> bytes:
    """The format before authentication: a SHA-256 over the blob with its own field read as zeros."""
    zero = "0" * 64
    raw = safetensors.torch.save(
        tensors, metadata={**meta, "kvengine_blob_version": "1", "kvengine_blob_sha256": zero}
    )
    digest = hashlib.sha256(raw).hexdigest()
    return raw.replace(f':"{zero}"'.encode(), f':"{digest}"'.encode())


# How a writer re-encodes blobs; only "with_secret" (the control) has the engines' secret.
FORGERS: dict[str, Callable[[dict[str, str], dict[str, torch.Tensor], bytes], bytes]] = {
    "other_secret": lambda meta, tensors, _: encode(meta, tensors, secret=b"not the engines' secret"),
    "v1_format": lambda meta, tensors, _: _v1_blob(meta, tensors),
    "with_secret": lambda meta, tensors, secret: encode(meta, tensors, secret=secret),
}


def _plant(writer: Engine, tier: Tier, prompt_b: list[int], prompt_a: list[int], forge: str) -> int:
    """Store B's chunks (as `writer` stored them) under A's chunks' names in `tier`; returns how many."""
    bridge = _bridge(writer)
    keys_b, keys_a = _chunk_keys(writer, prompt_b, "tenant-b"), _chunk_keys(writer, prompt_a, "tenant-a")
    secret = writer.cache_config.tier_secret()
    for key_b, key_a in zip(keys_b, keys_a, strict=True):
        blob = tier.get(bridge.storage_name(CHUNK_PREFIX + key_b))
        assert blob is not None
        tensors = safetensors.torch.load(blob)  # anyone who can read the store can do this
        forged = FORGERS[forge]({**bridge.meta, "key": key_a}, tensors, secret)
        # The names are given to the forger: the test is of the MAC, not of hiding names.
        assert tier.put(bridge.storage_name(CHUNK_PREFIX + key_a), forged)
    return len(keys_a)


@pytest.mark.parametrize("forge", list(FORGERS))
def test_blobs_forged_on_disk_are_rejected_and_recomputed(tmp_path: Path, forge: str) -> None:
    model = tiny_model("llama")
    secret_file = _secret_file(tmp_path / "secret")
    prompt_a, prompt_b = random_prompt(PROMPT_LEN, 31), random_prompt(PROMPT_LEN, 32)
    blobs = tmp_path / "blobs"

    def engine() -> Engine:
        return tier_engine(model, tiers="disk", disk_tier_dir=str(blobs), tier_secret_file=secret_file)

    writer = engine()
    generate(writer, prompt_b, salt="tenant-b")
    writer.close()
    _plant(writer, DiskTier(blobs, 1 << 30), prompt_b, prompt_a, forge)

    victim = engine()
    tokens, cached = generate(victim, prompt_a, salt="tenant-a")
    victim.close()
    stats = victim.stats()
    cold = reference(model, prompt_a)
    if forge == "with_secret":  # the control: an authentic blob is used, and B's keys change A's answer
        assert cached == hit_len(prompt_a) and tokens != cold
        return
    assert tokens == cold and cached == 0
    assert stats["tier_faults_unauthenticated_total"] == 1  # the first chunk: loading stops there
    assert stats["prefill_tokens_total"] == PROMPT_LEN
    # Deleted and computed again: the next process hits every chunk and counts no fault.
    again = engine()
    tokens, cached = generate(again, prompt_a, salt="tenant-a")
    assert tokens == cold and cached == hit_len(prompt_a)
    assert not any(k.startswith("tier_faults") for k in again.stats())
    again.close()


def test_blobs_forged_in_redis_are_rejected_and_names_hide_keys(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811 (the fixture imported above)
) -> None:
    redis = pytest.importorskip("redis")
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    model = tiny_model("llama")
    secret_file = _secret_file(tmp_path / "secret", os.urandom(32).hex().encode())
    prompt = random_prompt(PROMPT_LEN, 33)

    def engine() -> Engine:
        return tier_engine(model, tiers="redis", redis_url=redis_server.url, tier_secret_file=secret_file)

    before = set(client.keys("*"))
    writer = engine()
    expected, _ = generate(writer, prompt, salt="tenant-a")
    writer.close()
    names = sorted(set(client.keys("*")) - before)
    keys = _chunk_keys(writer, prompt, "tenant-a")
    assert len(names) >= len(keys)
    assert not any(key.encode() in name for name in names for key in keys)  # no chunk key in a name
    # A process without the secret overwrites every blob it can see, in the old format,
    # with another blob's tensors under the metadata it read.
    blobs = [client.get(name) for name in names]
    for name, blob, donor in zip(names, blobs, blobs[1:] + blobs[:1], strict=True):
        meta = {k: v for k, v in _metadata(blob).items() if not k.startswith("kvengine_blob")}
        client.set(name, _v1_blob(meta, safetensors.torch.load(donor)))

    victim = engine()
    tokens, cached = generate(victim, prompt, salt="tenant-a")
    victim.close()
    assert tokens == expected == reference(model, prompt) and cached == 0
    assert victim.stats()["tier_faults_unauthenticated_total"] == 1
    secret = victim.cache_config.tier_secret()
    bridge = _bridge(victim)
    (tier,) = bridge.stack.tiers
    assert isinstance(tier, RedisTier)
    first = client.get(tier.key_prefix + bridge.storage_name(CHUNK_PREFIX + keys[0]))
    assert first is not None and decode(first, {**bridge.meta, "key": keys[0]}, secret=secret)  # rewritten
    client.close()


def _metadata(blob: bytes) -> dict[str, str]:
    """What anyone reading the store sees of a blob: its safetensors metadata."""
    meta = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])["__metadata__"]
    assert isinstance(meta, dict)
    return meta


def test_storage_names_depend_on_the_secret(tmp_path: Path) -> None:
    model = tiny_model("llama")
    engines = [
        tier_engine(model, tiers="host", tier_secret_file=_secret_file(tmp_path / name, name.encode() * 8))
        for name in ("one", "two")
    ]
    key = _chunk_keys(engines[0], random_prompt(8, 1), "")[0]
    one, two = (_bridge(e).storage_name(CHUNK_PREFIX + key) for e in engines)
    assert one.startswith(CHUNK_PREFIX) and two.startswith(CHUNK_PREFIX) and one != two
    assert key not in one and len(one) == len(CHUNK_PREFIX) + 64


# ---- where the secret comes from -----------------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(TIER_SECRET_ENV, raising=False)
    return tmp_path / "cache"


def test_default_secret_is_made_once_private_and_shared(cache_dir: Path) -> None:
    results: list[bytes] = []
    barrier = threading.Barrier(4)

    def make() -> None:  # processes starting at once must agree on one secret
        barrier.wait()
        results.append(CacheConfig().tier_secret())

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = cache_dir / "tier-secret"
    assert len(set(results)) == 1 and results[0] == path.read_bytes().strip()
    assert len(results[0]) == 64 and int(results[0], 16) >= 0  # 32 random bytes, as hex
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in cache_dir.iterdir()] == ["tier-secret"]  # no temporary file left
    assert CacheConfig().tier_secret() == results[0]


def test_secret_from_file_or_environment(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TIER_SECRET_ENV, "an environment secret, long enough")
    assert CacheConfig().tier_secret() == b"an environment secret, long enough"
    explicit = _secret_file(tmp_path / "file", b"a file secret, long enough")
    assert CacheConfig(tier_secret_file=explicit).tier_secret() == b"a file secret, long enough"
    assert not (cache_dir / "tier-secret").exists()
    monkeypatch.setenv(TIER_SECRET_ENV, "short")
    with pytest.raises(InvalidRequestError, match="at least 16"):
        CacheConfig().tier_secret()
    with pytest.raises(InvalidRequestError, match="cannot read"):
        CacheConfig(tier_secret_file=str(tmp_path / "missing")).tier_secret()


def test_engines_with_other_secrets_never_use_each_others_blobs(tmp_path: Path) -> None:
    model: LoadedModel = tiny_model("llama")
    prompt = random_prompt(PROMPT_LEN, 34)
    blobs = str(tmp_path / "blobs")
    first = tier_engine(
        model, tiers="disk", disk_tier_dir=blobs, tier_secret_file=_secret_file(tmp_path / "a")
    )
    expected, _ = generate(first, prompt)
    first.close()
    other = _secret_file(tmp_path / "b", b"another deployment's secret")
    second = tier_engine(model, tiers="disk", disk_tier_dir=blobs, tier_secret_file=other)
    tokens, cached = generate(second, prompt)
    second.close()
    assert tokens == expected and cached == 0  # its names differ: misses, not faults
    assert not any(k.startswith("tier_faults") for k in second.stats())
