"""The load generator of `kvengine bench serve`: closed-loop streaming clients against a server.

Each of N clients sends its next request when its previous one has finished
(closed loop, as `vllm bench serve --max-concurrency` and SGLang's
`bench_serving` do), until the duration is over or the request cap is reached,
whichever comes first; requests in flight then run to their end. Every request
streams (`stream: true` with `include_usage`) and is timed on the client: time
to the first content chunk, the gaps between content chunks, end to end. Token
counts come from the server's usage chunk.

It is not a server and knows nothing of the engine: it speaks only the OpenAI
HTTP API, so it can load any compatible server. Prompts are random words from
a fixed list: each client's sequence of prompts is fixed by the seed and its
index (and, in a chat, by the replies); only the interleaving of clients
depends on timing.
With several API keys, client i sends key i mod K: each key is one tenant,
and a result records the key's index, never the key.
Workloads are in workloads.py; summaries, /metrics and reports in bench.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvengine.bench.serving.workloads import LoadConfig, RequestSpec, make_workload
from kvengine.errors import KVEngineError


class ServerUnreachableError(KVEngineError):
    """The server did not answer (nothing listening, wrong address, not an OpenAI-style API)."""


@dataclass
class RequestResult:
    """What one request cost, as the client saw it. Times in seconds; `start_s` from the run's start."""

    workload: str
    start_s: float
    tenant: int = 0  # index of the client's API key (never the key itself)
    group: int | None = None  # shared-prefix group, None for other workloads
    ok: bool = False
    e2e_s: float = 0.0
    ttft_s: float | None = None  # None: no content arrived
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    num_chunks: int = 0  # content chunks received
    text: str = ""
    status: int | None = None
    error: str = ""


@dataclass
class LoadResult:
    """All requests of one run and the wall time they took (first sent to last finished)."""

    config: LoadConfig
    model: str  # as /v1/models names it
    requests: list[RequestResult]
    elapsed_s: float


def _chunk_text(event: dict[str, Any]) -> str:
    """The content of one stream chunk, for either endpoint ("" for role-only or usage chunks)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("delta") or {}).get("content") or ""


def _error_text(body: str) -> str:
    """OpenAI's error message from a response body, else the body itself (shortened)."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200]


def _on_event(result: RequestResult, event: dict[str, Any], start: float, last: list[float]) -> None:
    """Fold one parsed stream chunk into `result`; `last` holds the time of the previous content."""
    if "error" in event:
        result.error = f"error in stream: {_error_text(json.dumps(event))}"
        return
    text = _chunk_text(event)
    if text:
        now = time.perf_counter()
        if last:
            result.itl_s.append(now - last[0])
            last[0] = now
        else:
            result.ttft_s = now - start
            last.append(now)
        result.text += text
        result.num_chunks += 1
    usage = event.get("usage")
    if usage:
        result.prompt_tokens = int(usage.get("prompt_tokens", 0))
        result.completion_tokens = int(usage.get("completion_tokens", 0))
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = int(details.get("cached_tokens") or 0)


async def send_request(
    http: Any, spec: RequestSpec, t0: float, api_key: str | None = None, tenant: int = 0
) -> RequestResult:
    """Send one streaming request on `http` (an httpx.AsyncClient) as `api_key`'s tenant and time
    it; never raises for a failed request: the failure is recorded in the result."""
    import httpx

    start = time.perf_counter()
    result = RequestResult(spec.workload, start_s=start - t0, tenant=tenant, group=spec.group)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    last: list[float] = []
    done = got_usage = False
    try:
        async with http.stream("POST", spec.path, json=spec.body, headers=headers) as response:
            result.status = response.status_code
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", errors="replace")
                result.error = f"HTTP {response.status_code}: {_error_text(body)}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                got_usage = got_usage or bool(event.get("usage"))
                _on_event(result, event, start, last)
                if result.error:
                    return result
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    except json.JSONDecodeError as exc:
        result.error = f"stream chunk is not JSON: {exc}"
    finally:
        result.e2e_s = time.perf_counter() - start
    if not result.error and not done:
        result.error = "stream ended without [DONE]"
    elif not result.error and not got_usage:
        result.error = "stream had no usage chunk"
    result.ok = not result.error
    return result


class _Budget:
    """Requests left to start: stops at the deadline or the cap, whichever comes first."""

    def __init__(self, deadline: float, max_requests: int | None) -> None:
        self.deadline = deadline
        self.left = max_requests
        self.num_done = 0

    def take(self) -> bool:
        if time.perf_counter() >= self.deadline or self.left == 0:
            return False
        if self.left is not None:
            self.left -= 1
        return True


async def _client(
    http: Any,
    index: int,
    config: LoadConfig,
    budget: _Budget,
    t0: float,
    results: list[RequestResult],
) -> None:
    """One closed-loop client: next request when the previous one has finished."""
    workload = make_workload(config, index)
    api_key = config.api_keys[workload.tenant] if config.api_keys else None
    while budget.take():
        result = await send_request(http, workload.next_request(), t0, api_key, workload.tenant)
        workload.on_reply(result.text if result.ok else None)
        results.append(result)
        budget.num_done += 1


async def check_server(http: Any, url: str) -> str:
    """The id of the model served at `url`; ServerUnreachableError unless GET /v1/models answers."""
    import httpx

    try:
        response = await http.get("/v1/models", timeout=10.0)
    except httpx.HTTPError as exc:
        raise ServerUnreachableError(
            f"cannot reach a server at {url} ({type(exc).__name__}: {exc}); start one with "
            "`kvengine serve`, or pass --launch"
        ) from None
    if response.status_code != 200:
        raise ServerUnreachableError(
            f"{url}/v1/models answered HTTP {response.status_code}: {_error_text(response.text)}"
        )
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return "unknown"


async def _tick(budget: _Budget, config: LoadConfig, t0: float, report: Callable[[float], None]) -> None:
    """Report progress (0..1 of whichever bound ends the run first) twice a second, until cancelled."""
    while True:
        by_time = (time.perf_counter() - t0) / config.duration_s
        by_count = budget.num_done / config.max_requests if config.max_requests else 0.0
        report(min(1.0, max(by_time, by_count)))
        await asyncio.sleep(0.5)


def _progress_bar() -> Callable[[float], None]:
    """A callback drawing a tqdm bar of 0..1 (the share of the run's first-ending bound) on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc="bench serve", unit="%", file=sys.stderr, leave=True)

    def update(fraction: float) -> None:
        if bar.disable is True or bar.n >= 100:  # closed: the ticker and the end may both report 1.0
            return
        bar.update(int(100 * fraction) - bar.n)
        if fraction >= 1.0:
            bar.close()

    return update


def require_httpx() -> None:
    """KVEngineError naming the fix when httpx (the HTTP client, in the dev extra) is missing."""
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise KVEngineError("kvengine bench serve needs httpx: pip install 'httpx>=0.27'") from None


async def run_load_async(config: LoadConfig, progress: bool = False) -> LoadResult:
    """Run `config.num_clients` clients until the duration or the request cap ends the run.

    ServerUnreachableError if the server does not answer GET /v1/models first;
    a failed request is recorded, never raised. `progress` draws a bar on stderr.
    """
    require_httpx()
    import httpx

    # GET /v1/models as the first tenant; each client sends its own key on its requests.
    headers = {"Authorization": f"Bearer {config.api_keys[0]}"} if config.api_keys else {}
    limits = httpx.Limits(
        max_connections=config.num_clients + 2, max_keepalive_connections=config.num_clients
    )
    timeout = httpx.Timeout(config.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(
        base_url=config.url, headers=headers, timeout=timeout, limits=limits, trust_env=False
    ) as http:
        model = await check_server(http, config.url)
        bar = _progress_bar() if progress else None
        results: list[RequestResult] = []
        t0 = time.perf_counter()
        budget = _Budget(t0 + config.duration_s, config.max_requests)
        ticker = asyncio.create_task(_tick(budget, config, t0, bar)) if bar else None
        try:
            await asyncio.gather(
                *(_client(http, i, config, budget, t0, results) for i in range(config.num_clients))
            )
        finally:
            if ticker is not None:
                ticker.cancel()
        elapsed = time.perf_counter() - t0
    if bar:
        bar(1.0)
    return LoadResult(config, model, sorted(results, key=lambda r: r.start_s), elapsed)


def run_load(config: LoadConfig, progress: bool = False) -> LoadResult:
    """`run_load_async` on a fresh event loop (for callers without one)."""
    return asyncio.run(run_load_async(config, progress))
