"""`kvengine bench serve`: a load test of a running server, summarized as JSON rows and Markdown.

Runs the load generator (`load`) against a server's URL, or against a
`kvengine serve` it starts itself on a free loopback port (`launch`) and
stops afterwards. Around the run it reads the server's `/metrics` when there
is one (a 404 only drops those numbers) to check that the pool's referenced
blocks are back at their idle count afterwards (no leak), and, for a launched
server, samples its resident memory. It reports what the clients measured:
throughput, TTFT / ITL / end-to-end percentiles, prefix hit rate, failures.
With several API keys (tenants) it also reports each tenant's hit rate and
TTFT, and checks isolation: a tenant's first request with a shared prefix
that another tenant's finished request already sent should find nothing
cached, since each tenant's cache keys carry its own salt. Per-request rows
(tenant as the key's index, never the key) go to bench_serve_requests.jsonl.
It does not judge the numbers; benchmarks never assert on timings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from kvengine.bench.serving.launch import (
    LaunchConfig,
    blocks_in_use,
    launched_server,
    metric,
    scrape_metrics,
    settled_blocks_in_use,
)
from kvengine.bench.serving.load import LoadResult, RequestResult, require_httpx, run_load
from kvengine.bench.serving.workloads import LoadConfig
from kvengine.results import append_report, append_rows, make_row, markdown_table

_PERCENTILES = {"ttft": (50, 90, 99), "itl": (50, 90, 99), "e2e": (50, 99)}


def _percentiles(values: list[float], qs: tuple[int, ...]) -> dict[int, float]:
    """Linear-interpolated percentiles (NaN when there are no values): ordered by construction."""
    if not values:
        return {q: float("nan") for q in qs}
    return {q: float(v) for q, v in zip(qs, np.percentile(np.asarray(values), qs), strict=True)}


def _hit_rate(requests: list[RequestResult]) -> float:
    prompt = sum(r.prompt_tokens for r in requests)
    return sum(r.cached_tokens for r in requests) / prompt if prompt else 0.0


def cross_tenant_first_uses(requests: list[RequestResult]) -> list[RequestResult]:
    """Requests that are their tenant's first with their shared-prefix group when another tenant's
    request with that group had already finished: a cached prefix can only have come from another
    tenant, so with per-tenant salts they hit nothing beyond what a tokenizer prepends."""
    finished: dict[int, list[tuple[float, int]]] = {}  # group -> (end time, tenant) of ok requests
    for r in requests:
        if r.ok and r.group is not None:
            finished.setdefault(r.group, []).append((r.start_s + r.e2e_s, r.tenant))
    seen: set[tuple[int, int]] = set()
    firsts = []
    for r in sorted(requests, key=lambda r: r.start_s):
        if r.group is None or (r.tenant, r.group) in seen:
            continue
        seen.add((r.tenant, r.group))
        if r.ok and any(end < r.start_s and t != r.tenant for end, t in finished[r.group]):
            firsts.append(r)
    return firsts


def tenant_summaries(result: LoadResult) -> dict[int, dict[str, float]]:
    """Per tenant (key index): requests, failures, prefix hit rate, TTFT p50 / p99 (s)."""
    out = {}
    for tenant in sorted({r.tenant for r in result.requests}):
        reqs = [r for r in result.requests if r.tenant == tenant]
        ok = [r for r in reqs if r.ok]
        ttft = _percentiles([r.ttft_s for r in ok if r.ttft_s is not None], (50, 99))
        out[tenant] = {
            "num_requests": len(reqs),
            "num_failed": len(reqs) - len(ok),
            "prefix_hit_rate": _hit_rate(ok),
            "ttft_p50_s": ttft[50],
            "ttft_p99_s": ttft[99],
        }
    return out


def request_rows(result: LoadResult) -> list[dict[str, Any]]:
    """One JSON-ready row per request: what the client measured, without texts or keys."""
    keep = ["workload", "tenant", "group", "start_s", "ok", "status", "ttft_s", "e2e_s"]
    keep += ["prompt_tokens", "cached_tokens", "completion_tokens", "error"]
    return [{k: getattr(r, k) for k in keep} for r in result.requests]


def summarize(result: LoadResult) -> dict[str, float]:
    """The run's headline numbers; times in seconds, rates per second of the run's wall time."""
    ok = [r for r in result.requests if r.ok]
    samples = {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2e": [r.e2e_s for r in ok],
    }
    summary: dict[str, float] = {
        "num_requests": len(result.requests),
        "num_failed": len(result.requests) - len(ok),
        "duration_s": result.elapsed_s,
        "request_throughput": len(ok) / result.elapsed_s,
        "output_tokens_per_s": sum(r.completion_tokens for r in ok) / result.elapsed_s,
        "prefix_hit_rate": _hit_rate(ok),
        "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in ok])) if ok else 0.0,
        "mean_completion_tokens": float(np.mean([r.completion_tokens for r in ok])) if ok else 0.0,
    }
    for name, qs in _PERCENTILES.items():
        for q, value in _percentiles(samples[name], qs).items():
            summary[f"{name}_p{q}_s"] = value
    return summary


def _unit(metric: str) -> str:
    if metric.endswith("_s"):
        return "s"
    return {"request_throughput": "req/s", "output_tokens_per_s": "tok/s", "prefix_hit_rate": "fraction"}.get(
        metric, "count"
    )


def _main_table(summary: dict[str, float], extra: dict[str, float | None]) -> str:
    ms = lambda key: f"{1000 * summary[key]:.0f}"  # noqa: E731
    rows: list[list[Any]] = [
        ["requests (failed)", f"{summary['num_requests']:.0f} ({summary['num_failed']:.0f})"],
        ["duration (s)", f"{summary['duration_s']:.1f}"],
        ["request throughput (req/s)", f"{summary['request_throughput']:.3f}"],
        ["output tokens/s", f"{summary['output_tokens_per_s']:.1f}"],
        ["TTFT p50 / p90 / p99 (ms)", " / ".join(ms(f"ttft_p{q}_s") for q in (50, 90, 99))],
        ["ITL p50 / p90 / p99 (ms)", " / ".join(ms(f"itl_p{q}_s") for q in (50, 90, 99))],
        ["E2E p50 / p99 (s)", f"{summary['e2e_p50_s']:.2f} / {summary['e2e_p99_s']:.2f}"],
        ["prefix hit rate (cached / prompt tokens)", f"{summary['prefix_hit_rate']:.3f}"],
        [
            "mean prompt / completion tokens",
            f"{summary['mean_prompt_tokens']:.0f} / {summary['mean_completion_tokens']:.1f}",
        ],
    ]
    labels = {
        "pool_blocks_in_use_before": "pool blocks referenced, before / after (/metrics)",
        "server_rss_idle_mib": "server RSS idle / peak under load / VmHWM (MiB)",
    }
    before, after = extra.get("pool_blocks_in_use_before"), extra.get("pool_blocks_in_use_after")
    if before is not None and after is not None:
        rows.append([labels["pool_blocks_in_use_before"], f"{before:.0f} / {after:.0f}"])
    if extra.get("server_rss_idle_mib") is not None:
        rss = [extra.get(k) or 0.0 for k in ("server_rss_idle_mib", "server_rss_peak_mib", "server_hwm_mib")]
        rows.append([labels["server_rss_idle_mib"], " / ".join(f"{v:.0f}" for v in rss)])
    if extra.get("pool_used_mib_after") is not None:
        rows.append(
            ["pool memory in use after, prefix cache included (MiB)", f"{extra['pool_used_mib_after']:.0f}"]
        )
    return markdown_table(["metric", "value"], rows)


def _workload_table(result: LoadResult) -> str:
    rows = []
    for name in sorted({r.workload for r in result.requests}):
        reqs = [r for r in result.requests if r.workload == name]
        ok = [r for r in reqs if r.ok]
        ttft = _percentiles([r.ttft_s for r in ok if r.ttft_s is not None], (50,))[50]
        prompt = np.mean([r.prompt_tokens for r in ok]) if ok else 0.0
        rows.append(
            [
                name,
                len(reqs),
                len(reqs) - len(ok),
                f"{prompt:.0f}",
                f"{_hit_rate(ok):.3f}",
                f"{1000 * ttft:.0f}",
            ]
        )
    header = ["workload", "requests", "failed", "mean prompt tokens", "prefix hit rate", "TTFT p50 (ms)"]
    return markdown_table(header, rows)


def _tenant_table(tenants: dict[int, dict[str, float]]) -> str:
    rows = [
        [
            t,
            f"{s['num_requests']:.0f} ({s['num_failed']:.0f})",
            f"{s['prefix_hit_rate']:.3f}",
            f"{1000 * s['ttft_p50_s']:.0f} / {1000 * s['ttft_p99_s']:.0f}",
        ]
        for t, s in tenants.items()
    ]
    header = ["tenant (API key index)", "requests (failed)", "prefix hit rate", "TTFT p50 / p99 (ms)"]
    return markdown_table(header, rows)


def _isolation_note(firsts: list[RequestResult]) -> str:
    """The cross-tenant check in words ("" when no request qualified)."""
    if not firsts:
        return ""
    cached, prompt = sum(r.cached_tokens for r in firsts), sum(r.prompt_tokens for r in firsts)
    return (
        f"Tenant isolation: {len(firsts)} requests were their tenant's first with a shared prefix "
        f"that another tenant had already sent (and finished); they found {cached} of {prompt} "
        "prompt tokens cached (per-tenant salts: only what every prompt starts with may hit)."
    )


def _failures(result: LoadResult, limit: int = 5) -> str:
    """The first few distinct failure messages, for the notes (empty when none failed)."""
    errors = list(dict.fromkeys(r.error for r in result.requests if not r.ok))
    return "; ".join(errors[:limit])


def _mib(num_bytes: float | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**20


def _metrics_key(config: LoadConfig) -> str | None:
    return config.api_keys[0] if config.api_keys else None


def _measure(config: LoadConfig, launch: LaunchConfig | None, progress: bool) -> tuple[LoadResult, dict]:
    """Run the load, with the server launched around it if asked; also /metrics and memory."""
    if launch is None:
        before = blocks_in_use(scrape_metrics(config.url, _metrics_key(config)))
        result = run_load(config, progress)
        after = settled_blocks_in_use(config.url, _metrics_key(config), before)
        return result, {"pool_blocks_in_use_before": before, "pool_blocks_in_use_after": after}
    with launched_server(launch) as server:
        config = dataclasses.replace(config, url=server.url)
        before = blocks_in_use(scrape_metrics(server.url, _metrics_key(config)))
        extra: dict[str, float | None] = {"server_rss_idle_mib": server.rss_mib()}
        with server.sample_rss() as peak:
            result = run_load(config, progress)
        extra.update(
            pool_blocks_in_use_before=before,
            pool_blocks_in_use_after=settled_blocks_in_use(server.url, _metrics_key(config), before),
            server_rss_peak_mib=peak.max_mib,
            server_hwm_mib=server.hwm_mib(),
            pool_used_mib_after=_mib(
                metric(scrape_metrics(server.url, _metrics_key(config)), "kv_pool_used_bytes")
            ),
        )
    return result, extra


def _rows(
    result: LoadResult,
    summary: dict[str, float],
    tenants: dict[int, dict[str, float]],
    firsts: list[RequestResult],
    extra: dict[str, float | None],
    launch: LaunchConfig | None,
) -> list[dict]:
    """The run's JSON rows: headline numbers, per tenant (config.tenant), the isolation check, extras."""
    cfg = {k: v for k, v in dataclasses.asdict(result.config).items() if k not in ("api_keys", "url")}
    cfg["model"] = result.model
    cfg["num_tenants"] = result.config.num_tenants
    if launch is not None:
        cfg["server_args"] = list(launch.serve_args)
    rows = [make_row("serve", k, v, _unit(k), **cfg) for k, v in summary.items()]
    rows += [
        make_row("serve", "tenant_" + k, v, _unit(k), **cfg, tenant=t)
        for t, values in tenants.items()
        for k, v in values.items()
    ]
    if firsts:
        rows.append(make_row("serve", "cross_tenant_first_uses", len(firsts), "count", **cfg))
        rows.append(
            make_row("serve", "cross_tenant_first_use_hit_rate", _hit_rate(firsts), "fraction", **cfg)
        )
    rows += [
        make_row("serve", k, v, "MiB" if "mib" in k else "blocks", **cfg)
        for k, v in extra.items()
        if v is not None
    ]
    return rows


def run_serve_bench(
    config: LoadConfig,
    out_dir: Path,
    launch: LaunchConfig | None = None,
    report: Path | None = None,
    progress: bool = True,
    *,
    command: str = "kvengine bench serve",
) -> tuple[LoadResult, list[dict]]:
    """Run the load test; append JSON rows to out_dir/bench_serve.jsonl and one row per request to
    out_dir/bench_serve_requests.jsonl, write the tables to out_dir/bench_serve.md, print them, and append a section headed by `command` to `report` if given."""
    require_httpx()
    result, extra = _measure(config, launch, progress)
    summary, tenants = summarize(result), tenant_summaries(result)
    firsts = cross_tenant_first_uses(result.requests)
    rows = _rows(result, summary, tenants, firsts, extra, launch)
    body = _main_table(summary, extra) + "\n\n" + _workload_table(result)
    if len(tenants) > 1:
        body += "\n\n" + _tenant_table(tenants)
    failures = _failures(result)
    notes = f"Failures: {failures}" if failures else "No failed requests."
    if firsts:
        notes += " " + _isolation_note(firsts)
    out_dir.mkdir(parents=True, exist_ok=True)
    append_rows(out_dir / "bench_serve.jsonl", rows)
    run = {"time": rows[0]["time"], "model": result.model, "num_tenants": result.config.num_tenants}
    append_rows(out_dir / "bench_serve_requests.jsonl", ({**run, **r} for r in request_rows(result)))
    (out_dir / "bench_serve.md").write_text(body + "\n\n" + notes + "\n", encoding="utf-8")
    print(body + "\n\n" + notes)
    if report is not None:
        append_report(
            report, f"Serving load test: {config.num_clients} streaming clients", command, body, notes
        )
    return result, rows
