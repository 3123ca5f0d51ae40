"""GET /metrics: the counters move by what the responses report, the engine's stats pass through.

References: the `usage` of each response for token counters, `Engine.stats()`
for the engine's gauges (under the names `metrics.describe` gives them), the
engine's own block pool after a client drops a stream mid-way. Every sample
carries the `model_name` label.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import pytest
from conftest import tiny_model
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from test_server import ByteTokenizer, _client, _engine, _live_server, _wait_until

from kvengine.config import CacheConfig, ServerConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.engine import Engine
from kvengine.models import LoadedModel
from kvengine.server import create_app
from kvengine.server.metrics import ENGINE_METRICS, describe

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return dataclasses.replace(tiny_model("llama"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]


def _parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"{s.name} exported twice"
            samples[key] = s.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` of the tiny model, with `labels` besides `model_name`; 0 if absent."""
    labels = {"model_name": "tiny-llama", **labels}
    return samples.get((name, frozenset(labels.items())), 0.0)


def _engine_name(key: str) -> str:
    """The sample name an engine stats key is exported under."""
    return "kvengine_" + describe(key)[0]


def _scrape(client: TestClient | httpx.Client) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return _parse(r.text)


def test_counters_move_by_what_the_responses_report(model: LoadedModel) -> None:
    prompt = "a prompt that repeats " * 2  # 44 tokens: the second run hits the prefix cache
    auth = {"authorization": "Bearer k"}
    with _client(model, prefix_cache=True, api_keys=("k",)) as client:
        before = _scrape(client)  # no key needed for /metrics
        assert _value(before, "kvengine_requests_in_flight") == 0
        usages = []
        for stream in (False, False, True):
            req = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "stream": stream}
            if stream:
                req["stream_options"] = {"include_usage": True}
            r = client.post("/v1/completions", json=req, headers=auth)
            assert r.status_code == 200, r.text
            usages.append(r.json()["usage"] if not stream else _last_usage(r.text))
        assert client.post("/v1/completions", json={"prompt": 5}, headers=auth).status_code == 400
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        assert client.get("/no/such/path").status_code == 404
        after = _scrape(client)
        stats = client.engine.stats()  # type: ignore[attr-defined]

    def total(key: str) -> int:
        return sum(u[key] for u in usages)

    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert cached > 0
    route = "/v1/completions"
    assert _value(after, "kvengine_requests_total", route=route, status="200") == 3
    assert _value(after, "kvengine_requests_total", route=route, status="400") == 1
    assert _value(after, "kvengine_requests_total", route=route, status="401") == 1
    assert _value(after, "kvengine_requests_total", route="other", status="404") == 1
    assert _value(after, "kvengine_requests_total", route="/metrics", status="200") == 1  # `before`
    assert _value(after, "kvengine_prompt_tokens_total") == total("prompt_tokens")
    assert _value(after, "kvengine_completion_tokens_total") == total("completion_tokens") == 15
    assert _value(after, "kvengine_prefix_cache_hits_total") == cached
    assert _value(after, "kvengine_prefix_cache_queries_total") == total("prompt_tokens")
    # Idle, with blocks kept by the prefix cache only: held, but free to the usage gauge (as in vLLM).
    assert (
        _value(after, "kvengine_kv_pool_blocks_used") == _value(after, "kvengine_kv_pool_blocks_cached") > 0
    )
    assert _value(after, "kvengine_kv_cache_usage_ratio") == 0
    assert _value(after, "kvengine_time_to_first_token_seconds_count") == 3
    assert _value(after, "kvengine_inter_token_latency_seconds_count") == 3 * (5 - 1)
    assert _value(after, "kvengine_e2e_request_latency_seconds_count") == 3
    assert _value(after, "kvengine_requests_in_flight") == 0
    for key, value in stats.items():  # every engine stat, under its own name
        assert _value(after, _engine_name(key)) == value, key


def test_names_follow_prometheus_conventions(model: LoadedModel) -> None:
    with _client(model, prefix_cache=True) as client:
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        text = client.get("/metrics").text
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    assert "kvengine_prefix_hit_rate" not in names and "kvengine_cached_prompt_tokens" not in names
    for family in families:
        assert family.name.startswith("kvengine_") and family.documentation, family.name
        assert "stats()" not in family.documentation and "no description" not in family.documentation
        assert "bytes" not in family.name or family.name.endswith("_bytes"), family.name  # unit last
        for sample in family.samples:
            assert sample.labels.get("model_name") == model.name, sample
            if family.type == "counter" and not sample.name.endswith("_created"):
                assert sample.name.endswith("_total"), sample.name


def test_every_engine_stat_has_a_description(model: LoadedModel, tmp_path: Path) -> None:
    """So that a stats key the engine adds gets its metric name and help here (or this fails)."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    cache = CacheConfig(
        block_size=4, max_kv_bytes=2**22, prefix_cache=True, tiers="host", tier_secret_file=str(secret)
    )
    engine = Engine(model, cache)
    try:
        for key in engine.stats():
            name, help_text = describe(key)
            assert key in ENGINE_METRICS or help_text.startswith("Storage tier "), key
            assert name.endswith("_total") == key.endswith("_total"), key
    finally:
        engine.close()


def _last_usage(sse: str) -> dict:
    events = [ln[len("data: ") :] for ln in sse.split("\n\n") if ln.startswith("data: ")]
    return json.loads(events[-2])["usage"]


class _EngineWithMoreStats(Engine):
    """An engine whose stats gained keys after the server was written."""

    def stats(self) -> dict[str, float]:
        more = {"tier_host_hits_total": 7, "tier_disk_bytes": 123, "completion_tokens_total": -1}
        return {**super().stats(), **more}


def test_new_engine_stats_are_exported_and_names_never_clash(model: LoadedModel) -> None:
    engine = _EngineWithMoreStats(model, CacheConfig(block_size=4, max_kv_bytes=2**22))
    app = create_app(AsyncEngine(engine), model, ServerConfig())
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        text = client.get("/metrics").text
    samples = _parse(text)  # fails on a family exported twice
    assert "# TYPE kvengine_tier_host_hits_total counter" in text
    assert "# HELP kvengine_tier_host_hits_total Storage tier host: blobs found" in text
    assert "# TYPE kvengine_tier_disk_bytes gauge" in text
    assert _value(samples, "kvengine_tier_host_hits_total") == 7
    assert _value(samples, "kvengine_tier_disk_bytes") == 123
    assert _value(samples, "kvengine_completion_tokens_total") == 2  # the server's count wins


class _EngineCountingStats(Engine):
    num_stats_calls = 0

    def stats(self) -> dict[str, float]:
        self.num_stats_calls += 1
        return super().stats()


def test_a_scrape_reads_the_snapshot_not_the_engine(model: LoadedModel) -> None:
    engine = _EngineCountingStats(model, CacheConfig(block_size=4, max_kv_bytes=2**22))
    with TestClient(create_app(AsyncEngine(engine), model, ServerConfig())) as client:
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).status_code == 200
        calls = engine.num_stats_calls
        scrapes = [_scrape(client) for _ in range(3)]
        assert engine.num_stats_calls == calls  # /metrics never touches the engine, which may be stepping
        stats = engine.stats()
    for key, value in stats.items():  # the snapshot taken after the last step: the engine as it is now
        assert all(_value(s, _engine_name(key)) == value for s in scrapes), key


def test_a_dropped_stream_shows_idle_again_in_metrics(model: LoadedModel) -> None:
    engine = _engine(model)  # no prefix cache: idle means no block in use
    with _live_server(model, engine) as url, httpx.Client(base_url=url, timeout=30) as http:
        idle = _scrape(http)
        assert _value(idle, "kvengine_kv_pool_blocks_used") == 0
        req = {"prompt": "go on and on", "max_tokens": 1000, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=req) as r:
            lines = r.iter_lines()  # held: a dropped iterator closes the response at once
            assert next(lines).startswith("data: ")
            busy = _scrape(http)
            assert _value(busy, "kvengine_requests_running") == 1
            assert _value(busy, "kvengine_requests_in_flight") == 1
            assert _value(busy, "kvengine_kv_pool_blocks_used") > 0

        def idle_again() -> bool:
            now = _scrape(http)
            names = (
                "kvengine_kv_pool_blocks_used",
                "kvengine_requests_running",
                "kvengine_requests_in_flight",
            )
            return all(_value(now, name) == 0 for name in names)

        assert _wait_until(idle_again)
        after = _scrape(http)
    assert _value(after, "kvengine_e2e_request_latency_seconds_count") == 0  # aborted: no latency
    assert 0 < _value(after, "kvengine_completion_tokens_total") < 1000
    assert _value(after, "kvengine_requests_total", route="/v1/completions", status="200") == 1
