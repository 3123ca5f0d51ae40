"""The cluster's /metrics page: routing decisions and each replica's report, per replica and in all.

Plain Prometheus text, built from the replicas' reports
(`EngineReplica.record_routing_stats`: the routing decisions that sent each
its requests, by reason; requests; prompt tokens looked up in the prefix
cache and found there). A replica's counters start again from 0
when Ray replaces it; `replica="all"` sums the live replicas. The engine
metrics of one replica are its own /metrics (kvengine/server/metrics.py);
this module has no Ray import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kvengine.cluster.routing import REASONS

PREFIX = "kvengine_cluster_"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> str:
    lines = [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{PREFIX}{name}{{{text}}} {float(value)!r}")
    return "\n".join(lines) + "\n"


_REPORTED = {
    "requests": ("replica_requests_total", "Requests the replica received since it started"),
    "in_flight": ("replica_requests_in_flight", "Requests the replica is answering now"),
    "prefix_queries": ("prefix_cache_queries_total", "Prompt tokens looked up in the replica's prefix cache"),
    "prefix_hits": ("prefix_cache_hits_total", "Prompt tokens found in the prefix cache (pool or tiers)"),
    "prefix_tier_hits": ("prefix_cache_tier_hits_total", "Prompt tokens of prefix hits loaded from a tier"),
}


def render(model_name: str, reports: Mapping[str, Mapping[str, Any]]) -> str:
    """Prometheus text of the cluster (see module docstring); labels `model_name`, `replica`, `reason`."""
    base = {"model_name": model_name}
    decisions = {
        (r, why): int(n) for r, x in reports.items() for why, n in dict(x.get("decisions", {})).items()
    }
    replicas = sorted(reports)
    out = [_family("replicas", "gauge", "Live engine replicas", [(base, len(reports))])]
    samples = [
        ({**base, "replica": r, "reason": reason}, decisions.get((r, reason), 0))
        for r in replicas
        for reason in REASONS
    ]
    samples += [
        (
            {**base, "replica": "all", "reason": reason},
            sum(n for (_, why), n in decisions.items() if why == reason),
        )
        for reason in REASONS
    ]
    out.append(
        _family("routing_decisions_total", "counter", "Requests routed, by replica and reason", samples)
    )
    for field, (name, help_text) in _REPORTED.items():
        kind = "gauge" if name.endswith("in_flight") else "counter"
        values = [({**base, "replica": r}, float(reports[r].get(field, 0))) for r in sorted(reports)]
        values.append(({**base, "replica": "all"}, sum(v for _, v in values)))
        out.append(_family(name, kind, help_text, values))
    rates = []
    for r in [*sorted(reports), "all"]:
        rows = reports.values() if r == "all" else [reports[r]]
        queries = sum(float(x.get("prefix_queries", 0)) for x in rows)
        rates.append(
            ({**base, "replica": r}, sum(float(x.get("prefix_hits", 0)) for x in rows) / max(1.0, queries))
        )
    out.append(_family("prefix_cache_hit_rate", "gauge", "Prefix-cache hits over queries, in tokens", rates))
    return "".join(out)
