"""Storage tiers against real backends: memory, a temporary directory, a real redis-server.

The shared contract runs over every registered tier; LRU order is compared
with a brute-force reference; Redis is stopped and restarted under a live
tier; the codec is tested together with the tiers (tiers return what is
stored, the codec rejects what was damaged).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from redis_server import RedisServer, free_port, redis_server  # noqa: F401 (a fixture)

from kvengine.cache.blob import UnauthenticatedBlobError, decode, encode
from kvengine.cache.tiers import (
    TIERS,
    DiskTier,
    HostTier,
    MissingDependencyError,
    RedisTier,
    Tier,
    TierStack,
    make_tier,
)
from kvengine.errors import InvalidRequestError

MiB = 2**20


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:  # noqa: F811 (the fixture imported above)
    pytest.importorskip("redis")  # the optional extra kvengine[redis]
    if not redis_server.running:  # a failed fault test must not take the others down
        redis_server.start()
    return redis_server.url


def _redis_tier(url: str, **kwargs: object) -> RedisTier:
    # A fresh key prefix per tier: tests sharing the server never see each other's keys.
    return RedisTier(url=url, key_prefix=f"test:{uuid.uuid4().hex}:", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], Tier]]:
    """A factory of tiers of every registered kind; closes them after the test."""
    made: list[Tier] = []

    def build(kind: str) -> Tier:
        if kind == "host":
            tier: Tier = HostTier(capacity_bytes=MiB)
        elif kind == "disk":
            tier = DiskTier(tmp_path / "disk", capacity_bytes=MiB)
        elif kind == "redis":
            tier = _redis_tier(request.getfixturevalue("redis_url"))
        else:
            raise AssertionError(f"no test factory for tier {kind!r}: add one")
        made.append(tier)
        return tier

    yield build
    for tier in made:
        tier.close()


@pytest.mark.parametrize("kind", list(TIERS))
def test_put_get_contains_delete(make: Callable[[str], Tier], kind: str) -> None:
    tier = make(kind)
    assert tier.name == kind and isinstance(tier, TIERS[kind])
    assert tier.get("kvengine:v1:missing") is None and not tier.contains("kvengine:v1:missing")
    blobs = {f"kvengine:v1:{i:064x}": os.urandom(1000 + i) for i in range(5)}
    blobs["odd key/ü\n"] = b""  # keys are arbitrary strings; an empty blob is a blob
    for key, blob in blobs.items():
        assert tier.put(key, blob)
    for key, blob in blobs.items():
        assert tier.contains(key) and tier.get(key) == blob
    assert tier.bytes_used == sum(map(len, blobs.values()))
    first = next(iter(blobs))
    assert tier.put(first, b"replaced") and tier.get(first) == b"replaced"
    tier.delete(first)
    tier.delete(first)  # deleting what is not there is fine
    assert tier.get(first) is None and not tier.contains(first)
    assert tier.stats.hits == len(blobs) + 1 and tier.stats.misses == 2
    assert tier.stats.stores == len(blobs) + 1 and tier.stats.errors == 0
    tier.flush()


@pytest.mark.parametrize("kind", list(TIERS))
def test_two_threads_see_whole_blobs(make: Callable[[str], Tier], kind: str) -> None:
    tier = make(kind)
    keys = [f"k{i}" for i in range(8)]
    versions = {k: [bytes([i, v]) * 500 for v in range(4)] for i, k in enumerate(keys)}
    failures: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            key = rng.choice(keys)
            if rng.random() < 0.5:
                tier.put(key, rng.choice(versions[key]))
            else:
                blob = tier.get(key)
                if blob is not None and blob not in versions[key]:
                    failures.append(f"torn or foreign blob under {key}")

    threads = [threading.Thread(target=work, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert tier.bytes_used == sum(len(b) for k in keys if (b := tier.get(k)) is not None)


def _bounded(kind: str, tmp_path: Path, capacity: int) -> Tier:
    return HostTier(capacity) if kind == "host" else DiskTier(tmp_path / "lru", capacity)


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_lru_matches_a_reference(kind: str, tmp_path: Path) -> None:
    capacity = 1000
    tier = _bounded(kind, tmp_path, capacity)
    ref: OrderedDict[str, bytes] = OrderedDict()  # oldest access first
    rng = random.Random(0)
    evictions = 0
    for step in range(400):
        key = f"key-{rng.randrange(12)}"
        op = rng.random()
        if op < 0.45:
            blob = bytes([step % 256]) * rng.randrange(0, 450)
            assert tier.put(key, blob)
            ref.pop(key, None)
            ref[key] = blob
            while sum(map(len, ref.values())) > capacity:
                ref.popitem(last=False)
                evictions += 1
        elif op < 0.9:
            got = tier.get(key)
            assert got == ref.get(key)
            if key in ref:
                ref.move_to_end(key)
        else:
            tier.delete(key)
            ref.pop(key, None)
        assert tier.bytes_used == sum(map(len, ref.values())) <= capacity
    assert tier.stats.evictions == evictions > 0
    assert not tier.put("huge", b"x" * (capacity + 1))  # larger than the tier: refused
    assert not tier.contains("huge") and tier.bytes_used <= capacity


def test_disk_survives_a_restart_with_its_lru_order(tmp_path: Path) -> None:
    blobs = {f"kvengine:v1:{i}": os.urandom(300) for i in range(4)}
    first = DiskTier(tmp_path, capacity_bytes=10_000)
    for key, blob in blobs.items():
        first.put(key, blob)
    first.get("kvengine:v1:0")  # recency order now 1, 2, 3, 0
    first.close()
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / ".tmp-crashed").write_bytes(b"half a blob")
    (tmp_path / "notes.txt").write_text("not ours")

    # What a new process sees: every blob, in the same order.
    again = DiskTier(tmp_path, capacity_bytes=10_000)
    assert again.bytes_used == 1200 and all(again.contains(k) for k in blobs)
    assert not (tmp_path / "ab" / ".tmp-crashed").exists()  # a crashed write is cleaned up
    assert (tmp_path / "notes.txt").exists()  # other files are left alone
    smaller = DiskTier(tmp_path, capacity_bytes=650)  # evicts the least recently used at start
    assert [k for k in blobs if smaller.contains(k)] == ["kvengine:v1:0", "kvengine:v1:3"]
    assert smaller.stats.evictions == 2 and smaller.bytes_used == 600
    assert smaller.get("kvengine:v1:0") == blobs["kvengine:v1:0"]
    assert smaller.get("kvengine:v1:3") == blobs["kvengine:v1:3"]


def test_disk_files_are_named_by_key_hash(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, capacity_bytes=MiB)
    tier.put("kvengine:v1:abc", b"blob")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].parent.name == files[0].name[:2] and len(files[0].name) == 64
    assert files[0].read_bytes() == b"blob"


def test_disk_damage_is_rejected_by_the_codec(tmp_path: Path) -> None:
    meta = {"model": "m", "key": "k1"}
    tensors = {"k": torch.randn(2, 3, 16, 8), "v": torch.randn(2, 3, 16, 8)}
    tier = DiskTier(tmp_path, capacity_bytes=MiB)
    secret = b"sixteen bytes or more"
    tier.put("k1", encode(meta, tensors, secret=secret))
    (path,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert torch.equal(decode(tier.get("k1") or b"", meta, secret=secret)["v"], tensors["v"])

    path.write_bytes(path.read_bytes()[:-100])  # torn by a crash or a full disk
    torn = tier.get("k1")
    assert torn is not None and len(torn) == tier.bytes_used - 100  # the tier returns what is there
    with pytest.raises(UnauthenticatedBlobError):  # the header parses; the MAC does not hold
        decode(torn, meta, secret=secret)

    path.unlink()  # vanished behind the index: a miss, and forgotten
    assert tier.get("k1") is None and not tier.contains("k1") and tier.bytes_used == 0


def test_stack_promotes_hits_and_discards_everywhere(tmp_path: Path) -> None:
    host, disk = HostTier(MiB), DiskTier(tmp_path, MiB)
    stack = TierStack([host, disk])
    disk.put("a", b"blob-a")
    assert stack.get("a") == (b"blob-a", "disk")
    assert host.contains("a")  # promoted
    assert stack.get("a") == (b"blob-a", "host")
    assert stack.put("b", b"blob-b") and host.get("b") == disk.get("b") == b"blob-b"
    stack.discard("a")
    assert stack.get("a") is None and not host.contains("a") and not disk.contains("a")
    stats = stack.stats()
    assert stats["host_hits"] == 2 and stats["disk_hits"] == 2 and stats["disk_misses"] == 1
    assert set(stats) == {
        f"{t}_{c}" for t in ("host", "disk") for c in ("hits", "misses", "stores", "evictions", "errors")
    }
    assert not TierStack([HostTier(4)]).put("big", b"12345")  # no tier took it
    stack.flush()
    stack.close()


def test_registry_and_bad_arguments(tmp_path: Path) -> None:
    assert isinstance(make_tier("host", capacity_bytes=10), HostTier)
    assert isinstance(make_tier("disk", directory=tmp_path, capacity_bytes=10), DiskTier)
    with pytest.raises(InvalidRequestError, match="known tiers: host, disk, redis"):
        make_tier("tape")
    with pytest.raises(InvalidRequestError, match="capacity_bytes"):
        HostTier(-1)
    with pytest.raises(InvalidRequestError, match="distinct"):
        TierStack([HostTier(1), HostTier(1)])
    with pytest.raises(InvalidRequestError, match="url"):
        RedisTier(url="http://127.0.0.1:1")


def test_redis_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # what `import redis` sees when it is not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'kvengine\[redis\]'"):
        RedisTier()


def test_redis_tiers_share_blobs(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    one, two = (RedisTier(url=redis_url, key_prefix=prefix) for _ in range(2))  # as two processes
    other = _redis_tier(redis_url)
    assert one.put("chunk", b"computed by one")
    assert two.get("chunk") == b"computed by one" and other.get("chunk") is None
    two.delete("chunk")
    assert not one.contains("chunk")
    assert one.capacity_bytes is None and one.bytes_used == len(b"computed by one")


def test_redis_ttl_expires_blobs(redis_url: str) -> None:
    tier = _redis_tier(redis_url, ttl_s=0.05)
    tier.put("k", b"v")
    assert tier.get("k") == b"v"
    time.sleep(0.2)  # well past the ttl: Redis expires it on access
    assert tier.get("k") is None


def test_redis_server_errors_answer_false(redis_url: str) -> None:
    redis = pytest.importorskip("redis")
    admin = redis.Redis.from_url(redis_url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", str(4 * MiB))
    try:
        tier = _redis_tier(redis_url)
        assert not tier.put("big", b"x" * (8 * MiB))  # OOM: refused by the server
        assert tier.stats.errors == 1 and tier.available  # the server answered: not down
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def test_redis_down_answers_at_once_and_recovers(
    redis_server: RedisServer,  # noqa: F811 (the fixture imported above)
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kvengine.tiers")
    quick = _redis_tier(redis_url, retry_interval_s=0.2)
    patient = _redis_tier(redis_url, retry_interval_s=600.0)
    for tier in (quick, patient):
        assert tier.put("k", b"before")
    redis_server.stop()
    try:
        for tier in (quick, patient):
            for call in (
                lambda t=tier: t.get("k"),
                lambda t=tier: t.put("k", b"x"),
                lambda t=tier: t.contains("k"),
            ):
                out, seconds = _timed(call)
                assert out in (None, False) and seconds < 1.0
            assert not tier.available and tier.stats.errors >= 1
        assert patient.stats.errors == 1  # its later calls did not try the network
        downs = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(downs) == 2  # one warning per tier going down
    finally:
        redis_server.start()  # empty: nothing was persisted

    assert patient.put("k", b"after") is False and not patient.available  # still waiting to retry
    time.sleep(0.25)  # past quick's retry interval
    assert quick.put("k", b"after") and quick.available and quick.get("k") == b"after"
    assert [r.levelno for r in caplog.records].count(logging.INFO) == 1  # one "reachable again"


def test_redis_unreachable_at_start_does_not_raise() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    tier = RedisTier(url=url, retry_interval_s=600.0)
    assert not tier.available and tier.stats.errors == 1
    out, seconds = _timed(lambda: tier.get("k"))
    assert out is None and seconds < 0.05 and tier.stats.errors == 1  # no network while down
