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

A process is `python -m kvengine.bench.tiers --child ...`, printing one JSON
line; nothing is shared between them but the tier.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvengine.bench.report import append_report, append_rows, make_row, markdown_table
from kvengine.bench.serving import document_ids, time_to_first_token
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.models import load

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


def _spawn(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "kvengine.bench.tiers", "--child", *args]
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
        pairs.append((_spawn(args), _spawn(args)))
    return pairs


def run_tier_bench(
    model_name: str,
    tier_options: dict[str, Any],
    prefix_len: int,
    new_tokens: int,
    repeats: int,
    out: Path,
    report: Path,
) -> list[dict]:
    """Measure, append JSON rows to `out` and a table to `report`; returns the rows."""
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
        "kvengine bench tiers " + " ".join(sys.argv[3:]),
        body,
        f"Median of {repeats} pairs of fresh processes (A, then B after A exited), each pair on another "
        f"document; TTFT excludes model loading, after a warm-up request in each process.",
    )
    return rows


def add_tiers_bench_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "tiers",
        help="TTFT of a prefix computed by one process and loaded from a tier by the next",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--model", default="smollm2-135m", help="bundled model name or local HF directory")
    p.add_argument("--tier", choices=["redis", "disk"], default="redis", help="the shared tier")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for --tier redis")
    p.add_argument("--disk-dir", default="", help="directory for --tier disk (default: a new temp dir)")
    p.add_argument("--prefix-len", type=int, default=2048, help="tokens of the shared document")
    p.add_argument("--new-tokens", type=int, default=8, help="output tokens per request")
    p.add_argument("--repeats", type=int, default=3, help="pairs of processes (each on a new document)")
    p.add_argument("--out", default="docs/results/bench_tiers.jsonl", help="JSON rows are appended here")
    p.add_argument("--report", default="docs/benchmarks.md", help="Markdown report to append to")


def tier_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.tier == "redis":
        return {"tiers": "redis", "redis_url": args.redis_url}
    directory = args.disk_dir
    if not directory:
        import tempfile

        directory = tempfile.mkdtemp(prefix="kvengine-bench-tiers-")
    return {"tiers": "disk", "disk_tier_dir": directory}


def _child_main(argv: list[str]) -> None:
    model_name, options, prefix_len, seed, new_tokens = argv
    result = run_child(model_name, json.loads(options), int(prefix_len), int(seed), int(new_tokens))
    print(json.dumps(result))


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child_main(sys.argv[2:])
