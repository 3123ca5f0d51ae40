"""A cluster replica without Ray: the forwarded request answers what the single server answers; reports; metrics."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import tiny_model
from fastapi.testclient import TestClient
from test_fault_suite import _byte_tokenizer

from kvengine.cluster import metrics
from kvengine.cluster.keys import routing_key
from kvengine.cluster.prefix_tree import RoutingKey
from kvengine.cluster.replica import EngineReplica, ReplicaSpec, ledger_capacity
from kvengine.config import CacheConfig, ServerConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.engine import Engine
from kvengine.models import load
from kvengine.server import create_app

KEY = "sk-a"
AUTH = [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")]


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> ReplicaSpec:
    path = tmp_path_factory.mktemp("tiny-llama-bytes")
    tiny_model("llama").hf_model.save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    cache = CacheConfig(block_size=4, max_kv_bytes=1 << 22, prefix_cache=True)
    return ReplicaSpec(model=str(path), dtype="float32", server=ServerConfig(api_keys=(KEY,)), cache=cache)


async def _ask(replica: EngineReplica, path: str, body: dict, headers: list) -> tuple[int, dict, bytes]:
    raw = json.dumps(body).encode()
    key = routing_key("t", path, raw)
    status, head, out = 0, {}, b""
    route = [replica.instance, "prefix_hit"]
    async for message in replica.handle_http(
        "POST", path, b"", headers, raw, [key.tenant, list(key.blocks)], route
    ):
        if "start" in message:
            status, head = message["start"], dict(message["headers"])
        else:
            out += message["body"]
    return status, head, out


def test_replica_answers_as_the_single_server(spec: ReplicaSpec) -> None:
    model = load(spec.model, dtype="float32", progress=False)
    direct = create_app(AsyncEngine(Engine(model, spec.cache)), model, spec.server)
    body = {"prompt": "the cluster replica " * 4, "max_tokens": 6, "temperature": 0}
    with TestClient(direct) as client:
        want = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()
        stream = {**body, "stream": True}
        want_stream = client.post("/v1/completions", json=stream, headers={"Authorization": f"Bearer {KEY}"})
        unauthorized = client.post("/v1/completions", json=body)

    async def run() -> None:
        replica = EngineReplica(spec)
        try:
            status, head, out = await _ask(replica, "/v1/completions", body, AUTH)
            assert status == 200 and head[b"x-kvengine-replica"] == replica.instance.encode()
            assert json.loads(out)["choices"][0]["text"] == want["choices"][0]["text"]
            status, _, out = await _ask(replica, "/v1/completions", stream, AUTH)
            texts = [
                json.loads(x[6:])["choices"][0]["text"] for x in out.decode().split("\n\n") if x[6:7] == "{"
            ]
            want_texts = [
                json.loads(x[6:])["choices"][0]["text"]
                for x in want_stream.text.split("\n\n")
                if x[6:7] == "{"
            ]
            assert (
                status == 200 and "".join(texts) == "".join(want_texts) and out.endswith(b"data: [DONE]\n\n")
            )
            status, _, out = await _ask(replica, "/v1/completions", body, AUTH[1:])
            assert status == 401 == unauthorized.status_code and json.loads(out) == unauthorized.json()
            report = replica.record_routing_stats()
            assert report["requests"] == 3 and report["in_flight"] == 0
            assert report["decisions"] == {"prefix_hit": 3}
            assert report["prefix_hits"] > 0  # the second request reused the first one's prefix
            key = routing_key("t", "/v1/completions", json.dumps(body).encode())
            assert [key.tenant, list(key.blocks)] in report["keys"]
        finally:
            await replica.close()

    asyncio.run(run())


def test_ledger_capacity_counts_token_blocks_of_all_layers_and_heads(spec: ReplicaSpec) -> None:
    stats = {"pool_blocks": 6000.0}  # 3 layers x 2 kv-heads: 1000 token blocks of 4 tokens
    assert ledger_capacity(stats, 3, 2, spec) == 4000 * 3 // spec.chunk_chars


def test_cluster_metrics_per_replica_and_total() -> None:
    reports = {
        "r0": {
            "requests": 3,
            "in_flight": 1,
            "prefix_queries": 100,
            "prefix_hits": 60,
            "decisions": {"prefix_hit": 2},
        },
        "r1": {
            "requests": 1,
            "in_flight": 0,
            "prefix_queries": 100,
            "prefix_hits": 0,
            "decisions": {"no_match": 2},
        },
    }
    text = metrics.render("m", reports)
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    pre = "kvengine_cluster_"
    assert float(lines[pre + 'replicas{model_name="m"}']) == 2
    assert float(lines[pre + 'routing_decisions_total{model_name="m",replica="all",reason="no_match"}']) == 2
    assert float(lines[pre + 'routing_decisions_total{model_name="m",replica="r0",reason="prefix_hit"}']) == 2
    assert float(lines[pre + 'routing_decisions_total{model_name="m",replica="r0",reason="no_match"}']) == 0
    assert float(lines[pre + 'replica_requests_total{model_name="m",replica="all"}']) == 4
    assert float(lines[pre + 'prefix_cache_hit_rate{model_name="m",replica="r0"}']) == 0.6
    assert float(lines[pre + 'prefix_cache_hit_rate{model_name="m",replica="all"}']) == 0.3


class _Replica:
    """What Ray's router sees of a replica: its id and its latest report."""

    def __init__(self, name: str, stats: dict | None = None) -> None:
        from ray.serve.request_router import ReplicaID

        self.replica_id = ReplicaID(unique_id=name, deployment_id=None)  # type: ignore[arg-type]
        self.routing_stats = stats or {}
        self.max_ongoing_requests = 8


def _pending(request_id: str, key: list | None) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(
        kwargs={"key": key}, args=[], metadata=SimpleNamespace(internal_request_id=request_id)
    )


def test_ray_router_routes_by_prefix_counts_and_takes_reports() -> None:
    pytest.importorskip("ray.serve")
    from kvengine.cluster.ray_router import KvengineRequestRouter

    router = KvengineRequestRouter.__new__(KvengineRequestRouter)  # Ray's constructor needs a live deployment
    router.initialize_state(router="prefix", min_match=0.3)
    replicas = [_Replica("r0"), _Replica("r1")]
    a, b = ["salt-a", [1, 2, 3]], ["salt-b", [1, 2, 3]]

    def route(request_id: str, key: list) -> str:
        ranks = asyncio.run(router.choose_replicas(replicas, _pending(request_id, key)))  # type: ignore[arg-type]
        chosen = ranks[0][0]
        router.on_request_routed(_pending(request_id, key), chosen.replica_id, None)  # type: ignore[arg-type]
        return chosen.replica_id.unique_id

    home = route("1", a)
    pending = _pending("9", a)
    asyncio.run(router.choose_replicas(replicas, pending))  # type: ignore[arg-type]
    assert pending.kwargs["route"] == [home, "prefix_hit"]  # type: ignore[attr-defined]
    assert route("2", a) == home  # in flight on `home`: 1 vs 0 is not overloaded
    other = route("3", b)
    assert other != home  # tenant b never matches tenant a's blocks: the less loaded replica
    assert router.decisions[(home, "no_match")] == 1 and router.decisions[(home, "prefix_hit")] == 1
    assert router.decisions[(other, "no_match")] == 1
    router.on_request_completed(replicas[0].replica_id, "1")
    assert sum(router.in_flight.values()) == 2
    # A report from `other` saying it holds tenant a's prefix replaces the router's guess of it.
    next(r for r in replicas if r.replica_id.unique_id == other).routing_stats = {
        "instance": "x",
        "requests": 1,
        "keys": [["salt-a", [1, 2, 3, 4]]],
    }
    assert router.core.tree(other).match(RoutingKey("salt-a", (1, 2, 3))) == 0
    route("4", ["salt-z", []])
    assert router.core.tree(other).match(RoutingKey("salt-a", (1, 2, 3))) == 3
