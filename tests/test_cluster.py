"""The cluster on a real local Ray instance and a real redis-server: routing, tenants, a replica killed.

One cluster (2 replicas of a tiny random Llama with a byte tokenizer, the
cache-aware router, a shared Redis tier) serves every test of this module, in
the order written: starting Ray and Serve on 2 loaded cores takes a minute or
more, so it is done once. Marked `cluster`; one xdist group.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import tiny_model
from redis_server import RedisServer, free_port, redis_server  # noqa: F401  (fixture)
from test_fault_suite import _byte_tokenizer

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("cluster")]
if not os.environ.get("CI"):
    pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'kvengine[cluster]'")

A, B = "tenant-a", "tenant-b"
SHARED = "A long shared system prompt that this tenant sends before every question. " * 3
PRE = "kvengine_cluster_"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[str]:  # noqa: F811
    from kvengine.cluster.launch import ClusterConfig, start, stop
    from kvengine.cluster.replica import ReplicaSpec
    from kvengine.config import CacheConfig, ServerConfig

    path = tmp_path_factory.mktemp("tiny-llama-bytes")
    tiny_model("llama").hf_model.save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    cache = CacheConfig(
        block_size=4, max_kv_bytes=1 << 22, prefix_cache=True, tiers="redis", redis_url=redis_server.url
    )
    spec = ReplicaSpec(
        model=str(path), dtype="float32", server=ServerConfig(api_keys=(A, B)), cache=cache, chunk_chars=16
    )
    port = free_port()
    config = ClusterConfig(num_replicas=2, port=port, num_cpus=0.5, local_num_cpus=2, stats_period_s=0.5)
    start(spec, config)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop()


def _ask(url: str, tenant: str, prompt: str, max_tokens: int = 4) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(
        f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {tenant}"}, timeout=120
    )


def _metrics(url: str) -> dict[str, float]:
    """Each sample of the cluster's /metrics, by its name with labels."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and ln[0] != "#")}


def _count(metrics: dict[str, float], name: str, **labels: str) -> float:
    return sum(
        v
        for k, v in metrics.items()
        if k.startswith(PRE + name) and all(f'{a}="{b}"' in k for a, b in labels.items())
    )


def test_repeated_prefix_goes_to_the_same_replica(url: str) -> None:
    first = _ask(url, A, SHARED + "question 0?")
    assert first.status_code == 200, first.text
    home = first.headers["x-kvengine-replica"]
    for i in range(1, 5):
        r = _ask(url, A, SHARED + f"question {i}?")
        assert r.status_code == 200, r.text
        assert r.headers["x-kvengine-replica"] == home
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(SHARED) // 2
    metrics = _metrics(url)
    assert _count(metrics, "routing_decisions_total", replica="all", reason="prefix_hit") >= 4


def test_another_tenant_is_not_steered_by_the_first_ones_cache(url: str) -> None:
    home = _ask(url, A, SHARED + "where?").headers["x-kvengine-replica"]
    before = _metrics(url)
    other = _ask(url, B, SHARED + "where?")
    assert other.status_code == 200, other.text
    after = _metrics(url)
    hits = [_count(m, "routing_decisions_total", replica="all", reason="prefix_hit") for m in (before, after)]
    no_match = [
        _count(m, "routing_decisions_total", replica="all", reason="no_match") for m in (before, after)
    ]
    by_load = [
        _count(m, "routing_decisions_total", replica="all", reason="load_fallback") for m in (before, after)
    ]
    # Routed by load, not by A's prefix: "no_match", or "load_fallback" where Ray found the chosen
    # replica busy (on a loaded machine) and sent the request to the other one.
    assert hits[1] == hits[0]
    assert (no_match[1] - no_match[0]) + (by_load[1] - by_load[0]) == 1
    if no_match[1] == no_match[0] + 1:
        assert other.headers["x-kvengine-replica"] != home  # the emptier replica, when loads tie
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def _replica_actors() -> list[str]:
    import ray

    return [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"]
    ]


def test_killed_replica_is_replaced_and_redis_serves_its_prefix(url: str) -> None:
    import ray

    prompt = SHARED + "a question asked before the crash"
    home = _ask(url, A, prompt).headers["x-kvengine-replica"]
    names = _replica_actors()
    assert len(names) == 2
    victim = next(n for n in names if n.endswith("#" + home))  # actors are named ...#<replica id>
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    # Until Ray notices, a request sent to the dead replica is retried once elsewhere, else a 503.
    r = _ask(url, A, prompt)
    assert r.status_code in (200, 503), r.text
    if r.status_code == 503:
        assert "restarted" in r.json()["error"]["message"]
    answered = [_ask(url, A, prompt) for _ in range(3)]
    assert all(x.status_code == 200 for x in answered), [x.text for x in answered]
    survivor = answered[-1]
    assert survivor.headers["x-kvengine-replica"] != home
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        metrics = _metrics(url)
        if _count(metrics, "replicas") == 2 and len(_replica_actors()) == 2:
            break
        time.sleep(1)
    else:
        pytest.fail("Ray did not replace the killed replica")
    tier_hits = _count(_metrics(url), "prefix_cache_tier_hits_total", replica="all")
    assert tier_hits > 0  # the survivor read the dead replica's prefix from Redis
    assert _ask(url, B, "still answering?").status_code == 200
