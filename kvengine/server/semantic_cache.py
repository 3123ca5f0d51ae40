"""The server's use of the semantic cache (kvengine/semantic): the `semantic_cache` field, response flag, metrics.

A request opts in with `"semantic_cache": {"max_error": 0.05}` (and
`"allow_sampled": true` to let a request with temperature > 0 take part;
without it such a request runs as usual and its response says it bypassed
the cache). `respond` wraps the app's own responder:

- the text embedded is the prompt (completions) or the last message
  (chat); everything else that shapes the answer (the earlier messages,
  sampling parameters, press, and the caller's tenant salt) keys a separate
  cache space, so only requests equal in all of it but the wording of that
  text can share answers, and never across tenants;
- on a hit the cached answer is returned at once, without the engine;
  otherwise the request runs and its answer (finish reason "stop" or
  "length") is recorded;
- the response carries `"semantic_cache": {"hit": ..., "decision": ...,
  "similarity": ..., "threshold": ...}`.

Only single-choice, non-streaming requests without logprobs or echo may
opt in (a cached answer has no tokens or logprobs to stream); others are a
400 naming the conflict. The cache is built at the first request that asks
for it (the embedder runs the served model: `model-hidden`). Counters go to
/metrics through `SemanticCollector`, registered by `attach`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvengine.models import LoadedModel
from kvengine.semantic.cache import Lookup, SemanticCache, SemanticCacheConfig
from kvengine.semantic.embedder import make_embedder
from kvengine.server import openai_format as fmt

_COUNTERS = {
    "lookups": "Requests looked up in the semantic cache",
    "hits": "Requests answered from the semantic cache (same prompt or certified similarity)",
    "exact_hits": "Semantic-cache hits whose prompt text was the cached one",
    "explorations": "Would-be semantic-cache hits computed anyway to check the threshold",
    "observations": "Computed answers compared with a cached neighbour's",
    "wrong_observations": "Computed answers that differed from the cached neighbour's",
    "evictions": "Semantic-cache entries evicted",
}


class SemanticFront:
    """One server's semantic cache, built at first use, shared by all its requests."""

    def __init__(self, model: LoadedModel, config: SemanticCacheConfig | None = None) -> None:
        self.model = model
        self.config = config or SemanticCacheConfig()
        self.bypassed = 0  # opted in, but sampled without allow_sampled
        self._cache: SemanticCache | None = None
        self._lock = threading.Lock()

    def cache(self) -> SemanticCache:
        """The cache, built (embedder included) on the first call; blocking: call it in a thread."""
        with self._lock:
            if self._cache is None:
                self._cache = SemanticCache(make_embedder(self.config.embedder, self.model), self.config)
            return self._cache

    @property
    def built(self) -> SemanticCache | None:
        return self._cache


class SemanticCollector(Collector):
    """The front's counters as Prometheus metrics, read at scrape time (zeros until it is built)."""

    def __init__(self, front: SemanticFront, model_name: str) -> None:
        self.front, self.model_name = front, model_name

    def collect(self) -> Iterator[Metric]:
        cache = self.front.built
        for key, help_text in _COUNTERS.items():
            family = CounterMetricFamily(f"kvengine_semantic_cache_{key}", help_text, labels=["model_name"])
            family.add_metric([self.model_name], getattr(cache.stats, key) if cache else 0)
            yield family
        family = CounterMetricFamily(
            "kvengine_semantic_cache_bypassed_sampled",
            "Requests that opted in but were sampled (temperature > 0) without allow_sampled",
            labels=["model_name"],
        )
        family.add_metric([self.model_name], self.front.bypassed)
        yield family
        gauge = GaugeMetricFamily(
            "kvengine_semantic_cache_entries", "Answers held by the semantic cache", labels=["model_name"]
        )
        gauge.add_metric([self.model_name], cache.total_entries() if cache else 0)
        yield gauge


def attach(server: Any) -> SemanticFront:
    """Give `server` (the app's Service) a semantic front and export its metrics; returns the front."""
    front = SemanticFront(server.model)
    server.semantic = front
    server.metrics.registry.register(SemanticCollector(front, server.model_name))
    return front


def _refusal(body: Any, num_jobs: int) -> str | None:
    """Why this request cannot use the semantic cache, or None."""
    if body.stream:
        return "semantic_cache cannot be used with stream: true yet"
    if num_jobs != 1:
        return "semantic_cache needs exactly one prompt and one choice (n = 1)"
    if getattr(body, "logprobs", None) or getattr(body, "echo", False):
        return "semantic_cache cannot be used with logprobs or echo (a cached answer has neither)"
    return None


def _text_and_context(body: Any, chat: bool) -> tuple[str, str]:
    """(the text to embed, everything else of the conversation that shapes the answer, as JSON)."""
    if chat:
        *earlier, last = body.messages
        context = [m.model_dump() for m in earlier] + [{"role": last.role, "name": last.name}]
        return last.text(), json.dumps(context, sort_keys=True)
    prompt = body.prompt
    return (prompt, "") if isinstance(prompt, str) else ("", json.dumps(prompt))


def _space(salt: str, job: Any, context: str, chat: bool) -> str:
    """The cache space of a request: tenant salt, and a digest of all but the embedded text."""
    what = repr((chat, context, job.params, job.press)).encode()
    return salt + "|" + hashlib.sha256(what).hexdigest()


def _flag(found: Lookup | None, bypassed: bool = False) -> dict[str, Any]:
    if found is None:
        return {"hit": False, "decision": "bypassed" if bypassed else "miss"}
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731 (JSON has no infinity)
    return {
        "hit": found.hit,
        "decision": found.decision,
        "similarity": finite(found.similarity),
        "threshold": finite(found.threshold),
    }


Responder = Callable[..., Awaitable[Any]]


async def respond(server: Any, chat: bool, body: Any, jobs: list[Any], request: Any, inner: Responder) -> Any:
    """`inner(server, chat, body, jobs, request)`, through the semantic cache if the body opted in."""
    options = getattr(body, "semantic_cache", None)
    front: SemanticFront | None = getattr(server, "semantic", None)
    if options is None or front is None:
        return await inner(server, chat, body, jobs, request)
    reason = _refusal(body, len(jobs))
    if reason is not None:
        raise fmt.APIError(400, reason, param="semantic_cache")
    if body.temperature > 0 and not options.allow_sampled:
        front.bypassed += 1
        out = await inner(server, chat, body, jobs, request)
        if isinstance(out, dict):
            out["semantic_cache"] = _flag(None, bypassed=True)
        return out
    job = jobs[0]
    text, context = _text_and_context(body, chat)
    if not text.strip():
        raise fmt.APIError(400, "semantic_cache needs a prompt with text to compare", param="semantic_cache")
    cache = await asyncio.to_thread(front.cache)
    space = _space(job.cache_salt, job, context, chat)
    found = await asyncio.to_thread(cache.lookup, text, space, options.max_error)
    if found.hit:
        assert found.answer is not None
        num = len(await asyncio.to_thread(server.tokenizer.encode, found.answer, add_special_tokens=False))
        rid = fmt.new_id("chatcmpl" if chat else "cmpl")
        usage = fmt.usage(len(job.prompt_ids), num, 0)
        out = fmt.completion_object(chat, rid, server.model_name, [(found.answer, "stop", None)], usage)
        out["semantic_cache"] = _flag(found)
        return out
    out = await inner(server, chat, body, jobs, request)
    if isinstance(out, dict):
        choice = out["choices"][0]
        if choice["finish_reason"] in ("stop", "length"):
            answer = choice["message"]["content"] if chat else choice["text"]
            await asyncio.to_thread(cache.record, found, answer)
        out["semantic_cache"] = _flag(found)
    return out
