"""`kvengine bench serve`: the load generator against a real uvicorn server, summaries, bad input.

The server runs a tiny random Llama whose tokenizer maps every token to one
letter, so a reply's text, its streamed chunks and the server's usage count
can be compared one to one. The blocks the pool holds after a run are read
from the engine itself (the reference for the /metrics leak check).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from conftest import tiny_model

from kvengine.bench.serving.bench import run_serve_bench, summarize
from kvengine.bench.serving.launch import LaunchConfig, blocks_in_use, parse_prometheus
from kvengine.bench.serving.load import LoadResult
from kvengine.bench.serving.workloads import LoadConfig, make_workload
from kvengine.cli import main
from kvengine.config import CacheConfig, ServerConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.engine import Engine
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.server import create_app


class LetterTokenizer:
    """Encodes ASCII text as its bytes; decodes each id to one lowercase letter (no chat template)."""

    chat_template = None
    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("ascii"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return dataclasses.replace(tiny_model("llama"), tokenizer=LetterTokenizer())  # type: ignore[arg-type]


@contextmanager
def live_server(model: LoadedModel, engine: Engine, api_keys: tuple[str, ...] = ()) -> Iterator[str]:
    """A real uvicorn server on a free loopback port, in a background thread; with `api_keys`,
    each key is a tenant with its own prefix-cache salt."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(AsyncEngine(engine), model, ServerConfig(port=port, api_keys=api_keys))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


SMALL = dict(
    num_clients=4,
    duration_s=60.0,  # the request cap ends these runs, long before the duration
    prompt_len_range=(3, 8),
    max_tokens_range=(4, 12),
    shared_prefix_len=30,
    num_groups=2,
    turns=3,
)


def _referenced_blocks(engine: Engine) -> int:
    """Blocks held by requests (not merely kept by the prefix cache): 0 when nothing leaked."""
    evictable = engine.prefix.num_evictable_blocks if engine.prefix is not None else 0
    return engine.pool.num_used_blocks - evictable


def _run(model: LoadedModel, tmp_path: Path, workload: str, max_requests: int) -> tuple[LoadResult, list]:
    engine = Engine(model, CacheConfig(block_size=4, max_kv_bytes=2**22, prefix_cache=True))
    with live_server(model, engine) as url:
        config = LoadConfig(url=url, workload=workload, max_requests=max_requests, **SMALL)  # type: ignore[arg-type]
        result, rows = run_serve_bench(config, tmp_path, progress=False)
        # The server has returned every block a request held; only the prefix cache keeps some.
        engine.pool.check_invariants()
        assert _referenced_blocks(engine) == 0
        leak_check = {r["metric"]: r["value"] for r in rows}.get("pool_blocks_in_use_after")
        assert leak_check in (None, 0)  # None: a server without /metrics
    return result, rows


def _check_consistent(result: LoadResult) -> None:
    assert [r.error for r in result.requests if not r.ok] == []
    for r in result.requests:
        # one token = one letter = one streamed chunk; the usage chunk counts the same tokens
        assert r.completion_tokens == len(r.text) == r.num_chunks
        assert len(r.itl_s) == r.num_chunks - 1
        assert r.ttft_s is not None and 0 < r.ttft_s <= r.e2e_s
        assert 0 <= r.cached_tokens <= r.prompt_tokens
    summary = summarize(result)
    for name, qs in (("ttft", (50, 90, 99)), ("itl", (50, 90, 99)), ("e2e", (50, 99))):
        values = [summary[f"{name}_p{q}_s"] for q in qs]
        assert values == sorted(values) and values[0] > 0
    total = sum(r.completion_tokens for r in result.requests)
    assert summary["output_tokens_per_s"] == pytest.approx(total / result.elapsed_s)
    assert summary["num_failed"] == 0


def test_mixed_load_against_live_server(model: LoadedModel, tmp_path: Path) -> None:
    result, rows = _run(model, tmp_path, "mixed", max_requests=24)
    assert len(result.requests) == 24  # the cap, exactly: no client starts one past it
    assert {r.workload for r in result.requests} == {"shared-prefix", "multi-turn", "random"}
    _check_consistent(result)
    lines = (tmp_path / "bench_serve.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert len(parsed) == len(rows) and {"bench", "metric", "value", "unit", "config"} <= set(parsed[0])
    values = {row["metric"]: row["value"] for row in parsed}
    assert values["num_requests"] == 24 and values["num_failed"] == 0
    markdown = (tmp_path / "bench_serve.md").read_text()
    assert markdown.startswith("| metric | value |") and "| multi-turn | " in markdown


def test_shared_prefix_hits_the_prefix_cache(model: LoadedModel, tmp_path: Path) -> None:
    result, _ = _run(model, tmp_path, "shared-prefix", max_requests=12)
    _check_consistent(result)
    # Two prefixes of 30 words, 12 requests: all but the first of each group can reuse theirs.
    # The first requests of a group may run side by side and all miss; the later ones hit.
    assert summarize(result)["prefix_hit_rate"] > 0.3


def test_multi_turn_conversations_grow_and_restart() -> None:
    config = LoadConfig(workload="multi-turn", seed=3, **SMALL)  # type: ignore[arg-type]
    workload = make_workload(config, client_index=0)
    sizes = []
    for turn in range(4):
        spec = workload.next_request()
        assert spec.path == "/v1/chat/completions" and spec.body["stream"] is True
        sizes.append(len(spec.body["messages"]))
        workload.on_reply(f"reply {turn}")
    assert sizes == [1, 3, 5, 1]  # user; user, assistant, user; ...; then a new chat after 3 turns


def test_workloads_are_fixed_by_the_seed() -> None:
    def first_bodies(seed: int) -> list[dict]:
        config = LoadConfig(workload="mixed", seed=seed, **SMALL)  # type: ignore[arg-type]
        return [make_workload(config, i).next_request().body for i in range(6)]

    assert first_bodies(0) == first_bodies(0)
    assert first_bodies(0) != first_bodies(1)
    prefix_bodies = first_bodies(0)[::3]  # clients 0 and 3 run shared-prefix
    assert all(b["prompt"].count(" ") >= 30 for b in prefix_bodies)


def test_prometheus_parsing_and_leak_count() -> None:
    page = """# HELP kvengine_pool_blocks_used blocks
# TYPE kvengine_pool_blocks_used gauge
kvengine_pool_blocks_used 12.0
kvengine_pool_blocks_cached{model="m"} 9
kvengine_requests_total{status="ok"} 3
kvengine_requests_total{status="error"} 1
"""
    metrics = parse_prometheus(page)
    assert metrics["kvengine_requests_total"] == 4
    assert blocks_in_use(metrics) == 3
    assert blocks_in_use({"other": 1.0}) is None and blocks_in_use(None) is None


@pytest.mark.parametrize(
    "bad",
    [
        dict(num_clients=0),
        dict(max_requests=0),
        dict(duration_s=0.0),
        dict(prompt_len_range=(8, 3)),
        dict(workload="bursty"),
        dict(url="ftp://127.0.0.1"),
        dict(api_keys=("k0", "k0")),  # one key twice
        dict(api_keys=("k0", "")),
        dict(api_keys=("k0", "k1", "k2"), num_clients=2),  # a key no client would send
        dict(api_keys=("k0", "k1", "k2"), num_clients=4, num_groups=2),  # a tenant without a group
    ],
)
def test_bad_config_is_refused(bad: dict) -> None:
    with pytest.raises(InvalidRequestError):
        LoadConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "argv",
    [
        ["--clients", "0"],
        ["--duration-s", "-1"],
        ["--prompt-len-range", "64"],
        ["--max-tokens-range", "128,16"],
        ["--workload", "bursty"],
        ["--max-requests", "x"],
    ],
)
def test_bad_cli_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0]


def test_unreachable_server_and_bad_url_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as sock:  # a port nothing listens on once this socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--out", str(tmp_path)]) == 2
    assert "cannot reach a server" in capsys.readouterr().err
    assert main(["bench", "serve", "--url", "localhost:8000", "--out", str(tmp_path)]) == 2
    assert "url must start with http://" in capsys.readouterr().err
    assert main(["bench", "serve", "--launch", "--url", "http://127.0.0.1:1"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.model
def test_launch_runs_and_stops_the_bundled_server(bundled: LoadedModel, tmp_path: Path) -> None:
    config = LoadConfig(workload="mixed", max_requests=6, **{**SMALL, "shared_prefix_len": 64})  # type: ignore[arg-type]
    launch = LaunchConfig(bundled.name, ("--prefix-cache",), log_path=tmp_path / "server.log")
    result, rows = run_serve_bench(config, tmp_path, launch, progress=False)
    assert [r.error for r in result.requests if not r.ok] == [] and len(result.requests) == 6
    metrics = {row["metric"]: row["value"] for row in rows}
    assert metrics["server_hwm_mib"] >= metrics["server_rss_idle_mib"] > 0


KEYS = ("sk-tenant-zero", "sk-tenant-one", "sk-tenant-two")


def test_tenants_take_keys_round_robin_and_share_each_prefix_in_pairs() -> None:
    config = LoadConfig(workload="shared-prefix", api_keys=KEYS, **{**SMALL, "num_groups": 5})  # type: ignore[arg-type]
    assert [config.tenant_of(i) for i in range(4)] == [0, 1, 2, 0]
    owners = {g: [t for t in range(3) if g in config.tenant_groups(t)] for g in range(5)}
    assert all(len(tenants) == 2 for tenants in owners.values())  # every prefix: two tenants
    prefix_of: dict[int, set[str]] = {}
    for client in range(4):
        workload = make_workload(config, client)
        for _ in range(20):
            spec = workload.next_request()
            assert spec.group in config.tenant_groups(config.tenant_of(client))
            words = spec.body["prompt"].split()
            prefix_of.setdefault(spec.group, set()).add(" ".join(words[: SMALL["shared_prefix_len"]]))  # type: ignore[index]
    assert all(len(texts) == 1 for texts in prefix_of.values())  # a group's text is the same everywhere
    chats = LoadConfig(workload="multi-turn", api_keys=KEYS, **SMALL)  # type: ignore[arg-type]
    assert chats.num_tenants == 3  # two groups are enough where no prefix is shared
    one = LoadConfig(workload="shared-prefix", **SMALL)  # type: ignore[arg-type]
    assert one.num_tenants == 1 and one.tenant_groups(0) == [0, 1]


def _tenant_run(model: LoadedModel, tmp_path: Path, server_keys: tuple[str, ...]) -> dict[str, list[dict]]:
    """Shared-prefix load from three tenants through the CLI; the JSON rows by metric."""
    engine = Engine(model, CacheConfig(block_size=4, max_kv_bytes=2**22, prefix_cache=True))
    with live_server(model, engine, server_keys) as url:
        argv = ["bench", "serve", "--url", url, "--workload", "shared-prefix", "--clients", "4"]
        argv += ["--max-requests", "36", "--prompt-len-range", "3,8", "--max-tokens-range", "2,4"]
        argv += ["--shared-prefix-len", "30", "--num-groups", "3", "--out", str(tmp_path)]
        for key in KEYS:
            argv += ["--api-key", key]
        assert main(argv) == 0
    rows: dict[str, list[dict]] = {}
    for line in (tmp_path / "bench_serve.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["metric"], []).append(row)
    return rows


def test_tenants_are_reported_apart_and_never_hit_each_others_prefixes(
    model: LoadedModel, tmp_path: Path
) -> None:
    rows = _tenant_run(model, tmp_path, server_keys=KEYS)
    requests = [
        json.loads(line) for line in (tmp_path / "bench_serve_requests.jsonl").read_text().splitlines()
    ]
    assert len(requests) == 36 and all(r["ok"] for r in requests)
    assert {r["tenant"] for r in requests} == {0, 1, 2}
    for name in ("bench_serve.jsonl", "bench_serve_requests.jsonl", "bench_serve.md"):
        assert not any(key in (tmp_path / name).read_text() for key in KEYS)  # indices, never keys
    per_tenant = {row["config"]["tenant"]: row["value"] for row in rows["tenant_num_requests"]}
    assert per_tenant == {t: sum(r["tenant"] == t for r in requests) for t in range(3)}
    hits = {row["config"]["tenant"]: row["value"] for row in rows["tenant_prefix_hit_rate"]}
    for t in range(3):  # each tenant's own repeats of its two prefixes hit
        mine = [r for r in requests if r["tenant"] == t]
        assert hits[t] == pytest.approx(
            sum(r["cached_tokens"] for r in mine) / sum(r["prompt_tokens"] for r in mine)
        )
        assert hits[t] > 0.2
    # A tenant's first request with a prefix another tenant already sent finds nothing cached.
    assert rows["cross_tenant_first_uses"][0]["value"] >= 1
    assert rows["cross_tenant_first_use_hit_rate"][0]["value"] == 0.0
    assert "Tenant isolation:" in (tmp_path / "bench_serve.md").read_text()


def test_the_isolation_check_sees_hits_across_tenants_when_there_is_no_salt(
    model: LoadedModel, tmp_path: Path
) -> None:
    # A server without API keys gives every caller the same salt: the same check must see hits.
    rows = _tenant_run(model, tmp_path, server_keys=())
    assert rows["cross_tenant_first_uses"][0]["value"] >= 1
    assert rows["cross_tenant_first_use_hit_rate"][0]["value"] > 0.5
