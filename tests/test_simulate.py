"""Traces and trace replay: loader errors, the synthetic generator, replay vs brute force, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvengine.cli import main
from kvengine.errors import InvalidRequestError
from kvengine.sim.replay import canonical_paths, replay, serving_order, unbounded_hits
from kvengine.sim.trace import (
    BLOCK_TOKENS,
    SyntheticTraceConfig,
    TraceRequest,
    generate_trace,
    load_trace,
    save_trace,
)

MOONCAKE_HEAD = Path(__file__).parent / "data" / "mooncake" / "trace_head.jsonl"  # see its README
GOOD = '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"timestamp": 0, "input_length": 600, "output_length": 5}', "missing field 'hash_ids'"),
        (GOOD.replace('"timestamp": 0', '"timestamp": "noon"'), "field 'timestamp'"),
        (GOOD.replace('"input_length": 600', '"input_length": 6.5'), "field 'input_length'"),
        (GOOD.replace('"output_length": 5', '"output_length": -1'), "field 'output_length'"),
        (GOOD.replace("[0, 1]", "[0, true]"), "field 'hash_ids' must be a list"),
        (GOOD.replace("[0, 1]", "[0]"), "has 1 ids but input_length 600 makes 2 blocks"),
    ],
)
def test_bad_trace_lines_name_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(InvalidRequestError, match=f"t.jsonl:3: .*{message}"):
        load_trace(path)


def test_trace_round_trip_and_empty_or_missing_files(tmp_path: Path) -> None:
    requests = generate_trace(SyntheticTraceConfig(num_requests=50, seed=3))
    save_trace(tmp_path / "a.jsonl", requests)
    assert load_trace(tmp_path / "a.jsonl") == requests
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidRequestError, match="has no requests"):
        load_trace(tmp_path / "empty.jsonl")
    with pytest.raises(InvalidRequestError, match="cannot read trace"):
        load_trace(tmp_path / "missing.jsonl")


def test_generator_is_deterministic_and_prefix_consistent() -> None:
    config = SyntheticTraceConfig(num_requests=400, seed=7, multi_turn_prob=0.5)
    requests = generate_trace(config)
    assert requests == generate_trace(config)
    assert requests != generate_trace(SyntheticTraceConfig(num_requests=400, seed=8))
    assert [r.timestamp for r in requests] == sorted(r.timestamp for r in requests)
    parent_of: dict[int, int] = {}
    for r in requests:
        assert len(r.hash_ids) == -(-r.input_length // BLOCK_TOKENS)
        for parent, block in zip((-1, *r.hash_ids), r.hash_ids, strict=False):
            # An id names its block and the whole prefix: it always follows the same parent.
            assert parent_of.setdefault(block, parent) == parent
    # Multi-turn: some request extends an earlier prompt past its last whole block.
    full_prefixes = {r.hash_ids[: r.input_length // BLOCK_TOKENS] for r in requests}
    assert any(
        r.hash_ids[: len(p)] == p and len(r.hash_ids) > len(p) + 1
        for r in requests
        for p in full_prefixes
        if p
    )


def test_generator_config_is_validated() -> None:
    with pytest.raises(InvalidRequestError, match="doc_prob must be in"):
        SyntheticTraceConfig(doc_prob=1.5)
    with pytest.raises(InvalidRequestError, match="num_requests must be >= 1"):
        SyntheticTraceConfig(num_requests=0)


def brute_force_lru(requests: list[TraceRequest], capacity: int) -> tuple[int, int, int]:
    """Block-level LRU written naively: (hit blocks, hit tokens, evicted blocks).

    A block's last use is the last request holding it; among equal last uses the
    deepest block goes first, which is always a block no cached block extends.
    """
    last_use: dict[int, tuple[int, int]] = {}  # block -> (request index, -depth)
    hit_blocks = hit_tokens = evicted = 0
    for i, path in enumerate(canonical_paths(requests)):
        path = path[:capacity]
        hits = 0
        while hits < len(path) and path[hits] in last_use:
            hits += 1
        hit_blocks += hits
        hit_tokens += min(hits * BLOCK_TOKENS, requests[i].input_length)
        need = len(path) - hits - (capacity - len(last_use))
        others = sorted((use, b) for b, use in last_use.items() if b not in path[:hits])
        for _, b in others[: max(0, need)]:
            del last_use[b]
            evicted += 1
        for depth, b in enumerate(path):
            last_use[b] = (i, -depth)
    return hit_blocks, hit_tokens, evicted


@pytest.mark.parametrize("capacity", [5, 40, 150])
def test_replay_matches_brute_force_lru(capacity: int) -> None:
    config = SyntheticTraceConfig(
        num_requests=250, seed=1, system_tokens=600, doc_tokens=1500, num_documents=20
    )
    requests = serving_order(generate_trace(config))
    result = replay(requests, capacity, "lru")
    assert (result.hit_blocks, result.hit_tokens, result.evicted_blocks) == brute_force_lru(
        requests, capacity
    )
    assert result.input_blocks == sum(len(r.hash_ids) for r in requests)


def test_mooncake_trace_replays_as_brute_force_lru() -> None:
    """The first 100 requests of Mooncake's published trace: its format loads, and replay on its
    real prefix sharing equals the naive LRU (and the unbounded ceiling once everything fits)."""
    requests = serving_order(load_trace(MOONCAKE_HEAD))
    assert len(requests) == 100
    assert requests[0].input_length == 40160 and len(requests[0].hash_ids) == 79
    for capacity in (64, 300):
        result = replay(requests, capacity, "lru")
        assert (result.hit_blocks, result.hit_tokens, result.evicted_blocks) == brute_force_lru(
            requests, capacity
        )
    ceiling = unbounded_hits(requests)
    assert ceiling.hit_tokens > 0  # requests do share prefixes
    full = replay(requests, ceiling.capacity_blocks, "lru")
    assert (full.hit_tokens, full.evicted_blocks) == (ceiling.hit_tokens, 0)


def test_replay_with_room_for_everything_is_unbounded() -> None:
    requests = generate_trace(SyntheticTraceConfig(num_requests=200, seed=2))
    ceiling = unbounded_hits(requests)
    for policy in ["lru", "gdsf", "belady"]:
        result = replay(requests, ceiling.capacity_blocks, policy)
        assert (result.hit_tokens, result.evicted_blocks) == (ceiling.hit_tokens, 0)
    assert replay(requests, 1, "lru").hit_tokens < ceiling.hit_tokens


def test_cli_simulate_writes_table_and_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace, rows = tmp_path / "syn.jsonl", tmp_path / "rows.jsonl"
    argv = ["simulate", "--generate", str(trace), "--num-requests", "120", "--policy", "all"]
    assert main([*argv, "--capacity-blocks", "20,80", "--out", str(rows)]) == 0
    out = capsys.readouterr().out
    for name in ["lru", "lfu", "gdsf", "predictive", "belady"]:
        assert f"| {name} | 20 |" in out and f"| {name} | 80 |" in out
    written = [json.loads(line) for line in rows.read_text().splitlines()]
    assert len(written) == 3 * (2 * 5 + 1)
    assert {r["metric"] for r in written} == {"token_hit_rate", "block_hit_rate", "evicted_blocks"}
    assert main(["simulate", "--trace", str(trace), "--capacity-blocks", "20"]) == 0
    assert "| lru | 20 |" in capsys.readouterr().out


def test_cli_simulate_help_explains(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: kvengine simulate")
    for text in ["--trace", "--generate", "--capacity-blocks", "--policy", "--out", "Belady", "belady"]:
        assert text in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "--trace", "t.jsonl", "--policy", "mru"], "unknown policy mru; known: lru"),
        (["simulate", "--trace", "t.jsonl", "--capacity-blocks", "0"], "must be >= 1"),
        (["simulate", "--capacity-blocks", "8"], "one of the arguments --trace --generate is required"),
    ],
)
def test_cli_simulate_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_cli_simulate_bad_trace_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.jsonl").write_text(GOOD + "\n{}\n")
    assert main(["simulate", "--trace", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bad.jsonl:2: missing field 'timestamp'" in err
