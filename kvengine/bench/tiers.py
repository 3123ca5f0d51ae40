"""`kvengine bench tiers`: a prefix computed by one process, hit from a tier by the next.

Each repeat runs two fresh processes, one after the other, over the same
storage tier (Redis or a disk directory) and the same prompt (a
`prefix_len`-token document and a short question), each in a new engine:

- process A finds nothing cached: it prefills the whole prompt and writes
  the prefix's blocks through to the tier (its time to first token is the
  cold baseline);
- process B, started after A has exited, finds the prefix in the tier and
  loads its blocks instead of computing them.

Reported: both times to first token (model loading excluded; each process
warms up on an unrelated short prompt first), their ratio, the tokens B
reused from the tier, and whether B's output equals A's token for token.
Each repeat uses another document, so A is always cold.

A process is `python -m kvengine.cli bench tiers --child ...` (`spawn_child`),
which runs `run_child` and prints its result as one JSON line; nothing is
shared between the processes but the tier.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvengine.bench.throughput import document_ids, time_to_first_token
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.models import load
from kvengine.results import append_report, append_rows, make_row, markdown_table

CHILD_TIMEOUT_S = 600


def run_child(
    model_name: str, tier_options: dict[str, Any], prefix_len: int, seed: int, new_tokens: int
) -> dict:
    """One process's request: returns its TTFT, reused tokens, output and engine counters."""
    model = load(model_name, progress=False)
    doc = document_ids(model, prefix_len + 64, seed=seed)
    prompt = doc[:prefix_len] + document_ids(model, 32, seed=10_000 + seed)[:32]
    cache = CacheConfig(prefix_cache=True, max_kv_bytes=2 * 2**30, **tier_options)
    engine = Engine(model, cache, SchedulerConfig(max_step_tokens=len(prompt)))
    time_to_first_token(engine, document_ids(model, 48, seed=99_999)[:48], 1)  # warm-up: first-call costs
    ttft, cached, output = time_to_first_token(engine, prompt, new_tokens)
    engine.close()  # waits for the write-through to finish
    return {"ttft_s": ttft, "cached_tokens": cached, "output": output, "stats": engine.stats()}


def spawn_child(args: list[str]) -> dict:
    """Run `run_child` in a new process; `args` are its arguments as text (tier options as JSON)."""
    cmd = [sys.executable, "-m", "kvengine.cli", "bench", "tiers", "--child", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark process failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_tier_ttft(
    model_name: str, tier_options: dict[str, Any], prefix_len: int, new_tokens: int, repeats: int
) -> list[tuple[dict, dict]]:
    """`repeats` pairs of (process A, process B) results, each pair on a new document."""
    pairs = []
    options = json.dumps(tier_options)
    for seed in range(repeats):
        args = [model_name, options, str(prefix_len), str(seed), str(new_tokens)]
        pairs.append((spawn_child(args), spawn_child(args)))
    return pairs


def run_tier_bench(
    model_name: str,
    tier_options: dict[str, Any],
    prefix_len: int,
    new_tokens: int,
    repeats: int,
    out: Path,
    report: Path,
    *,
    command: str = "kvengine bench tiers",
) -> list[dict]:
    """Measure, append JSON rows to `out` and a table to `report` (headed by `command`); returns the rows."""
    pairs = measure_tier_ttft(model_name, tier_options, prefix_len, new_tokens, repeats)
    cold = statistics.median(a["ttft_s"] for a, _ in pairs)
    warm = statistics.median(b["ttft_s"] for _, b in pairs)
    reused = min(b["cached_tokens"] for _, b in pairs)
    identical = all(a["output"] == b["output"] for a, b in pairs)
    tier = tier_options["tiers"]
    cfg = dict(model=model_name, tier=tier, prefix_len=prefix_len, repeats=repeats)
    rows = [
        make_row("tiers", "ttft_s", cold, "s", process="A (cold)", **cfg),
        make_row("tiers", "ttft_s", warm, "s", process="B (tier hit)", cached_tokens=reused, **cfg),
        make_row("tiers", "ttft_speedup", cold / warm, "x", outputs_identical=identical, **cfg),
    ]
    append_rows(out, rows)
    header = ["tier", "prefix tokens", "TTFT A cold (s)", "TTFT B tier hit (s)", "speedup", "tokens reused"]
    body = markdown_table(
        [*header, "B's output = A's"],
        [[tier, prefix_len, f"{cold:.3f}", f"{warm:.3f}", f"{cold / warm:.1f}", reused, identical]],
    )
    print(body)
    append_report(
        report,
        f"Prefix hit across processes through the {tier} tier",
        command,
        body,
        f"Median of {repeats} pairs of fresh processes (A, then B after A exited), each pair on another "
        f"document; TTFT excludes model loading, after a warm-up request in each process.",
    )
    return rows
