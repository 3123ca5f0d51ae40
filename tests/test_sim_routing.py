"""Routing replay (kvengine/sim/routing.py) against plain replays of each replica's share of the trace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvengine.errors import InvalidRequestError
from kvengine.sim.replay import replay, serving_order
from kvengine.sim.routing import TimeModel, replay_routed
from kvengine.sim.trace import SyntheticTraceConfig, generate_trace

TRACE = serving_order(generate_trace(SyntheticTraceConfig(num_requests=300, num_documents=20, seed=3)))


@pytest.mark.parametrize("router", ["prefix", "round_robin", "least_load"])
def test_one_replica_is_the_single_cache_replay(router: str) -> None:
    for capacity in (50, 400):
        routed = replay_routed(TRACE, 1, capacity, router)
        single = replay(TRACE, capacity, "lru")
        assert routed.hit_tokens == single.hit_tokens
        assert routed.requests_per_replica == (len(TRACE),)


def test_round_robin_is_each_replicas_share_replayed_alone() -> None:
    routed = replay_routed(TRACE, 3, 200, "round_robin")
    alone = sum(replay(TRACE[i::3], 200, "lru").hit_tokens for i in range(3))
    assert routed.hit_tokens == alone
    assert routed.decisions == {"round_robin": len(TRACE)}


def test_prefix_routing_keeps_more_hits_than_cache_blind_routers() -> None:
    results = {r: replay_routed(TRACE, 4, 200, r) for r in ("prefix", "round_robin", "least_load")}
    assert results["prefix"].hit_tokens > 1.2 * results["round_robin"].hit_tokens
    assert results["prefix"].hit_tokens > 1.2 * results["least_load"].hit_tokens
    assert results["prefix"].decisions.get("prefix_hit", 0) > 0
    assert sum(results["prefix"].decisions.values()) == len(TRACE)


def test_overload_sends_requests_elsewhere() -> None:
    """One system prompt for all: the prefix router would pile every request on one replica."""
    one_prefix = SyntheticTraceConfig(
        num_requests=200, num_system_prompts=1, doc_prob=0.0, multi_turn_prob=0.0
    )
    trace = serving_order(generate_trace(one_prefix))
    slow = TimeModel(prefill_tokens_per_s=1000.0, decode_s_per_token=0.05)  # many requests in flight
    routed = replay_routed(trace, 4, 400, "prefix", time_model=slow)
    assert routed.decisions.get("load_fallback", 0) > 0
    assert min(routed.requests_per_replica) > len(trace) // 10
    fast = replay_routed(trace, 4, 400, "prefix", time_model=TimeModel(decode_s_per_token=1e-6))
    assert fast.decisions.get("load_fallback", 0) == 0 and max(fast.requests_per_replica) > len(trace) * 0.9


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(InvalidRequestError, match="num_replicas"):
        replay_routed(TRACE, 0, 10, "prefix")
    with pytest.raises(InvalidRequestError, match="unknown router 'x'"):
        replay_routed(TRACE, 2, 10, "x")


def test_simulate_command_with_replicas(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "kvengine.cli",
        "simulate",
        "--generate",
        str(trace),
        "--num-requests",
        "200",
    ]
    cmd += ["--replicas", "2", "--router", "prefix,round_robin", "--capacity-blocks", "100"]
    cmd += ["--out", str(tmp_path / "rows.jsonl")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| prefix | 2 | 100 |" in out.stdout and "| round_robin | 2 | 100 |" in out.stdout
    assert "token_hit_rate" in (tmp_path / "rows.jsonl").read_text()
    bad = subprocess.run([*cmd[:-2], "--router", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown router nope; known: round_robin, least_load, prefix" in bad.stderr
