"""`kvengine bench semantic`: hit rate and observed error of the semantic cache at several error bounds.

Two measurements per embedder, on prompts generated from templates
(kvengine/semantic/pairs.py; a prompt's answer is its answer key, so
whether a reused answer is right is known exactly):

- pairs: the cosine similarity of labelled pairs (paraphrases, hard
  negatives that differ in one entity or number, easy negatives), the
  ROC AUC of paraphrase vs each kind of negative, and what the best static
  threshold (one number for all, as GPTCache-style caches use) would get
  wrong;
- replay: streams of prompts (skewed key popularity, each key in random
  phrasings) replayed through a fresh `SemanticCache` per threshold policy
  and error bound. A miss or exploration "computes" the true answer; a hit
  returns the cached one, wrong when its key differs. Reported: hit rate,
  hits that were not the same prompt text, the error rate among hits with
  its 95% Wilson interval, and whether the bound lies at or above the
  interval's lower end (the bound is met up to sampling error).

Embeddings are computed once per distinct text (memoized); the replay
itself involves no model. Writes JSON rows and a Markdown section.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel, load
from kvengine.results import append_report, append_rows, make_row, markdown_table
from kvengine.semantic.cache import SemanticCache, SemanticCacheConfig
from kvengine.semantic.embedder import Embedder, make_embedder
from kvengine.semantic.pairs import Pair, make_pairs, make_stream
from kvengine.semantic.thresholds import wilson_interval

BENCH = "semantic"


class MemoEmbedder(Embedder):
    """An embedder's vectors, computed once per distinct text; counts the time spent computing them."""

    def __init__(self, inner: Embedder, name: str) -> None:
        self.inner, self.dim, self.name = inner, inner.dim, name
        self.memo: dict[str, np.ndarray] = {}
        self.seconds = 0.0

    @classmethod
    def create(cls, model: LoadedModel | None) -> Embedder:
        raise NotImplementedError("wrap an embedder instead")

    def embed(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            start = time.perf_counter()
            self.memo.update(zip(new, self.inner.embed(new), strict=True))
            self.seconds += time.perf_counter() - start
        return np.stack([self.memo[t] for t in texts])


@dataclass(frozen=True)
class SemanticBench:
    """What `run_semantic_bench` measures."""

    embedders: tuple[str, ...] = ("model-hidden", "hashed-ngrams")
    policies: tuple[str, ...] = ("vcache", "global")
    bounds: tuple[float, ...] = (0.01, 0.05, 0.1)
    num_pairs: int = 400
    num_prompts: int = 600  # per replayed stream
    num_keys: int = 120  # distinct answers per stream
    seeds: tuple[int, ...] = (0, 1, 2)  # one stream each
    confidence: float = 0.95
    explore_rate: float = 0.1

    def __post_init__(self) -> None:
        SemanticCacheConfig(explore_rate=self.explore_rate, confidence=self.confidence)  # checks both
        if not self.bounds or not all(0.0 < b < 1.0 for b in self.bounds):
            raise InvalidRequestError(f"error bounds must be in (0, 1), got {list(self.bounds)}")


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random positive's similarity > a random negative's), ties counted half."""
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def _pair_rows(emb: Embedder, pairs: list[Pair], name: str) -> list[dict[str, Any]]:
    a = emb.embed([p.a.text for p in pairs])
    b = emb.embed([p.b.text for p in pairs])
    sims = np.sum(a * b, axis=1)
    kinds = np.array([p.kind for p in pairs])
    same = np.array([p.same_answer for p in pairs])
    rows = [
        make_row(BENCH, f"mean_similarity_{k}", float(sims[kinds == k].mean()), "cosine", embedder=name)
        for k in ("paraphrase", "hard_negative", "easy_negative")
    ]
    pos = sims[kinds == "paraphrase"]
    for k in ("hard_negative", "easy_negative"):
        rows.append(make_row(BENCH, f"auc_paraphrase_vs_{k}", _auc(pos, sims[kinds == k]), "", embedder=name))
    # The best single threshold over these pairs (in hindsight): its accuracy and the error among its hits.
    best = max(np.unique(sims), key=lambda t: float(np.mean((sims >= t) == same)))
    above = sims >= best
    rows.append(make_row(BENCH, "static_threshold", float(best), "cosine", embedder=name))
    rows.append(make_row(BENCH, "static_accuracy", float(np.mean(above == same)), "", embedder=name))
    wrong = float(np.mean(~same[above])) if above.any() else 0.0
    rows.append(make_row(BENCH, "static_error_among_hits", wrong, "", embedder=name))
    return rows


def _replay(emb: Embedder, spec: SemanticBench, policy: str, bound: float, seed: int) -> dict[str, int]:
    """One stream through a fresh cache; counts of lookups, hits, wrong hits and the rest."""
    config = SemanticCacheConfig(
        embedder=emb.name if isinstance(emb, MemoEmbedder) else "custom",
        index="faiss-flat",
        policy=policy,
        confidence=spec.confidence,
        explore_rate=spec.explore_rate,
        seed=seed,
    )
    cache = SemanticCache(emb, config)
    wrong = 0
    for prompt in make_stream(spec.num_prompts, spec.num_keys, seed=seed):
        found = cache.lookup(prompt.text, max_error=bound)
        if found.hit:
            wrong += found.answer != prompt.key
        else:
            cache.record(found, prompt.key)
    s = cache.stats
    return {
        "lookups": s.lookups,
        "hits": s.hits,
        "exact_hits": s.exact_hits,
        "wrong_hits": wrong,
        "explorations": s.explorations,
        "observations": s.observations,
    }


def _replay_rows(emb: Embedder, spec: SemanticBench, name: str) -> list[dict[str, Any]]:
    rows = []
    for bound in spec.bounds:
        for policy in spec.policies:
            runs = [_replay(emb, spec, policy, bound, seed) for seed in spec.seeds]
            total = {k: sum(r[k] for r in runs) for k in runs[0]}
            hits, wrong = total["hits"], total["wrong_hits"]
            low, high = wilson_interval(wrong, hits, 0.95)
            config = dict(
                embedder=name,
                policy=policy,
                max_error=bound,
                seeds=list(spec.seeds),
                num_prompts=spec.num_prompts,
                num_keys=spec.num_keys,
                **total,
            )
            rows += [
                make_row(BENCH, "hit_rate", hits / total["lookups"], "", **config),
                make_row(
                    BENCH, "semantic_hit_rate", (hits - total["exact_hits"]) / total["lookups"], "", **config
                ),
                make_row(
                    BENCH,
                    "error_among_hits",
                    wrong / hits if hits else 0.0,
                    "",
                    ci95=[float(low), float(high)],
                    within_bound=bool(low <= bound),
                    **config,
                ),
                make_row(BENCH, "error_per_request", wrong / total["lookups"], "", **config),
            ]
    return rows


def run_semantic_bench(
    model_name: str, spec: SemanticBench, out: Path, report: Path, command: str = "", dtype: str = "auto"
) -> list[dict[str, Any]]:
    """Measure every embedder in `spec`; append JSON rows to `out` and a Markdown section to `report`."""
    model = (
        load(model_name, dtype=dtype, progress=False)
        if any(e.startswith("model-") for e in spec.embedders)
        else None
    )
    pairs = make_pairs(spec.num_pairs, seed=1234)
    rows: list[dict[str, Any]] = []
    for name in spec.embedders:
        emb = MemoEmbedder(make_embedder(name, model), name)
        rows += _pair_rows(emb, pairs, name)
        rows += _replay_rows(emb, spec, name)
        per_text = emb.seconds / max(1, len(emb.memo))
        rows.append(
            make_row(BENCH, "embed_seconds_per_prompt", per_text, "s", embedder=name, texts=len(emb.memo))
        )
    append_rows(out, rows)
    body = markdown(rows, spec)
    append_report(report, "Semantic response cache: hit rate and error at error bounds", command, body)
    print(body)
    return rows


def _value(rows: Sequence[dict[str, Any]], metric: str, **match: Any) -> dict[str, Any]:
    return next(
        r for r in rows if r["metric"] == metric and all(r["config"].get(k) == v for k, v in match.items())
    )


def _pair_table(rows: Sequence[dict[str, Any]], spec: SemanticBench) -> str:
    metrics = ("mean_similarity_paraphrase", "mean_similarity_hard_negative", "mean_similarity_easy_negative",
               "auc_paraphrase_vs_hard_negative", "auc_paraphrase_vs_easy_negative")  # fmt: skip
    table = []
    for name in spec.embedders:
        v = {m: _value(rows, m, embedder=name)["value"] for m in metrics}
        static = [_value(rows, m, embedder=name)["value"] for m in
                  ("static_threshold", "static_accuracy", "static_error_among_hits")]  # fmt: skip
        ms = 1000 * _value(rows, "embed_seconds_per_prompt", embedder=name)["value"]
        table.append(
            [name, *(f"{v[m]:.3f}" for m in metrics), " / ".join(f"{x:.3f}" for x in static), f"{ms:.1f}"]
        )
    header = ["embedder", "cos paraphrase", "cos hard neg", "cos easy neg", "AUC vs hard", "AUC vs easy",
              "best static threshold / accuracy / error among hits", "embed ms / prompt"]  # fmt: skip
    return markdown_table(header, table)


def _replay_table(rows: Sequence[dict[str, Any]], spec: SemanticBench) -> str:
    table = []
    for name in spec.embedders:
        for bound in spec.bounds:
            for policy in spec.policies:
                err = _value(rows, "error_among_hits", embedder=name, policy=policy, max_error=bound)
                c = err["config"]
                low, high = c["ci95"]
                table.append([
                    name, policy, bound, c["lookups"], f"{c['hits'] / c['lookups']:.3f}",
                    f"{(c['hits'] - c['exact_hits']) / c['lookups']:.3f}", c["wrong_hits"],
                    f"{err['value']:.4f} [{low:.4f}, {high:.4f}]", f"{c['wrong_hits'] / c['lookups']:.4f}",
                    "yes" if c["within_bound"] else "NO", c["explorations"],
                ])  # fmt: skip
    header = ["embedder", "policy", "max error", "lookups", "hit rate", "non-exact hit rate", "wrong hits",
              "error among hits [95% CI]", "error per request", "bound met", "explorations"]  # fmt: skip
    return markdown_table(header, table)


def markdown(rows: Sequence[dict[str, Any]], spec: SemanticBench) -> str:
    """Two tables: pair similarities per embedder, then hit rate and error per embedder, policy and bound."""
    return (
        f"Pairs: {spec.num_pairs} labelled pairs (40% paraphrases, 40% hard negatives differing in one "
        "entity or number, 20% other intents).\n\n"
        + _pair_table(rows, spec)
        + f"\n\nReplay: {len(spec.seeds)} streams of {spec.num_prompts} prompts over {spec.num_keys} answers "
        f"each, summed; confidence {spec.confidence}, exploration {spec.explore_rate}.\n\n"
        + _replay_table(rows, spec)
    )
