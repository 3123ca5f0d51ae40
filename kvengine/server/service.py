"""The state behind the routes: `Service` (engine, model, limits, requests in flight) and `Job`.

`Service` turns a parsed request into a `Job` (4xx if it cannot run), admits
it to the `AsyncEngine` and runs it as a stream of text deltas, and drains
the requests in flight when the server shuts down (`drain`). Each rule is
checked once: the body's shape by its pydantic model, the server's limits
here, everything else by what the body becomes (`SamplingParams`, a press
from the registry, the engine's request), whose InvalidRequestError is a
400; reading a body is body.py's. It uses the engine only through `AsyncEngine`'s public API, and knows
nothing of HTTP responses or routes (app.py), nor of OpenAI's wire format
beyond the errors it raises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from kvengine.config import ServerConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.generate import TextStream
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press.registry import press_from_spec
from kvengine.server import openai_format as fmt
from kvengine.server.body import read_body
from kvengine.server.job import Job, add_jobs, as_400, grammar_of, max_tokens_of, rag_of
from kvengine.server.logprobs import logprob_params
from kvengine.server.metrics import ServerMetrics
from kvengine.server.schemas import ChatMessage, ChatRequest, CompletionRequest
from kvengine.server.tenancy import tenant_salt

B = TypeVar("B", bound=BaseModel)

_DRAIN_POLL_S = 0.05  # how often a shutdown checks whether the requests in flight have ended
_ENDING_S = 5.0  # how long a shutdown waits for the final events of the requests it ended


class Service:
    """The state behind the routes: engine, model, limits, requests in flight."""

    def __init__(
        self, llm: AsyncEngine, model: LoadedModel, config: ServerConfig, model_name: str | None = None
    ) -> None:
        if model.tokenizer is None:
            raise InvalidRequestError("the server needs a model with a tokenizer")
        self.llm = llm
        self.model = model
        self.model_name = model_name or model.name  # what clients call it: /v1/models, `model` fields
        self.tokenizer = model.tokenizer
        self.vocab_size = int(model.config.vocab_size)
        self.config = config
        self.num_in_flight = 0
        self.draining = False  # shutting down: new requests are refused (503), those in flight finish
        # The engine also refuses prompts that leave no room for a new token; refused
        # here, such a prompt gets OpenAI's code for it (context_length_exceeded).
        self.max_prompt_tokens = min(config.max_prompt_tokens, model.max_context_len - 1)
        self.metrics = ServerMetrics(llm.stats, lambda: self.num_in_flight, self.model_name)
        self.max_chars_per_token = _longest_token_chars(model.tokenizer)

    def tenant(self, request: Request) -> str:
        return tenant_salt(self.config, request)

    async def read_body(self, request: Request, cls: type[B]) -> B:
        """`body.read_body` under this server's limits: the body parsed as `cls`, else a 4xx."""
        return await read_body(request, cls, self.config)

    def check_model(self, name: str | None) -> None:
        """404 unless `name` (a body's `model`) is None or the name this server serves under."""
        if name is not None and name != self.model_name:
            raise fmt.APIError(
                404,
                f"model {name!r} is not served here; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """400 naming the ids outside the model's vocabulary, if any."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
            raise fmt.APIError(
                400,
                f"{param}: token ids {shown} are outside the vocabulary [0, {self.vocab_size})",
                param=param,
            )

    async def prompt_ids(self, body: CompletionRequest) -> list[list[int]]:
        """Token ids of each prompt of a completion request, in order; 400 for an empty or bad one."""
        prompts = body.prompts()
        if len(prompts) > self.config.max_concurrent_requests:
            raise fmt.APIError(
                400,
                f"{len(prompts)} prompts; at most {self.config.max_concurrent_requests} per request",
                param="prompt",
            )
        batch = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            ids = await self.encode(prompt, param) if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise fmt.APIError(400, f"{param}: the prompt is empty", param=param)
            self.check_token_ids(ids, param)
            batch.append(ids)
        return batch

    def jobs(
        self, body: CompletionRequest | ChatRequest, prompt_ids: list[int], salt: str, group: int = 0
    ) -> list[Job]:
        """The choices of one prompt: `n` jobs (`best_of` of them, for completions to rank).

        Choice i samples with `seed + i` when a seed is given, so each is
        reproducible and no two are the same draw.
        """
        job = self.job(body, prompt_ids, salt)
        best_of = body.best_of if isinstance(body, CompletionRequest) and body.best_of else body.n
        if best_of < body.n:
            raise fmt.APIError(400, f"best_of ({best_of}) must be >= n ({body.n})", param="best_of")
        if best_of > body.n and body.stream:
            raise fmt.APIError(400, "best_of > n cannot be streamed", param="best_of")
        ranked = best_of > body.n and job.params.logprobs is None  # log-probabilities to rank by
        out = []
        for i in range(best_of):
            seed = None if body.seed is None else (body.seed + i) % 2**63
            params = replace(job.params, seed=seed, logprobs=0 if ranked else job.params.logprobs)
            choice = replace(
                job, params=params, group=group, hide_logprobs=ranked, output_ids=[], logprobs=[]
            )
            out.append(choice)
        return out

    def job(self, body: CompletionRequest | ChatRequest, prompt_ids: list[int], salt: str) -> Job:
        """The request as the engine will run it; 4xx if this server refuses it.

        The body's shape was checked when it was parsed. Here are the server's
        own limits (the model it serves, prompt and output lengths); the
        rest is checked by what the body becomes: `SamplingParams` and the
        press registry here, the engine when the job is admitted (`admit`).
        """
        self.check_model(body.model)
        self._check_stop(body.stop_strings())
        if len(prompt_ids) > self.max_prompt_tokens:
            raise fmt.APIError(
                400,
                f"the prompt has {len(prompt_ids)} tokens; at most {self.max_prompt_tokens} are allowed",
                param="prompt",
                code="context_length_exceeded",
            )
        max_tokens = max_tokens_of(body)
        if max_tokens is None:
            max_tokens = min(self.config.max_tokens_limit, self.model.max_context_len - len(prompt_ids))
        elif max_tokens > self.config.max_tokens_limit:
            raise fmt.APIError(
                400,
                f"max_tokens must be in [1, {self.config.max_tokens_limit}], got {max_tokens}",
                param="max_tokens",
            )
        logprobs, prompt_logprobs = logprob_params(body)
        with as_400():
            params = SamplingParams(
                max_tokens,
                body.temperature,
                body.top_p,
                body.top_k,
                body.seed,
                body.stop_strings(),
                ignore_eos=body.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                logit_bias=self._logit_bias(body.logit_bias),
                min_tokens=body.min_tokens,
                grammar=grammar_of(body),
            )
        press = None
        if body.kv_press is not None:
            with as_400(param="kv_press"):
                press = press_from_spec(body.kv_press, body.kv_compression_ratio)
        echo = isinstance(body, CompletionRequest) and body.echo
        return Job(prompt_ids, params, press, salt, echo=echo, rag=rag_of(body, prompt_ids, self.model))

    def _logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias (token id strings -> bias) as SamplingParams takes it; 400 naming it if bad."""
        vocab = self.model.config.vocab_size
        pairs = []
        for key, value in (bias or {}).items():
            if not key.isdecimal() or int(key) >= vocab:
                raise fmt.APIError(
                    400, f"logit_bias: {key!r} is not a token id below {vocab}", param="logit_bias"
                )
            if not -100.0 <= value <= 100.0:
                raise fmt.APIError(
                    400, f"logit_bias: {value} for {key} is outside [-100, 100]", param="logit_bias"
                )
            pairs.append((int(key), float(value)))
        return tuple(sorted(pairs))

    def _check_stop(self, stop: tuple[str, ...]) -> None:
        """400 for stop lists past the limits: they are searched at every token of the output."""
        limit, chars = self.config.max_stop_strings, self.config.max_stop_string_chars
        if len(stop) > limit:
            raise fmt.APIError(
                400, f"at most {limit} stop strings are allowed, got {len(stop)}", param="stop"
            )
        longest = max((len(s) for s in stop), default=0)
        if longest > chars:
            raise fmt.APIError(
                400, f"stop strings may have at most {chars} characters, one has {longest}", param="stop"
            )

    def _check_chars(self, chars: int, param: str) -> None:
        """400 for text that must be longer than the prompt limit, without tokenizing it.

        Each token covers at most `max_chars_per_token` characters, so more
        characters than the limit times that cannot fit in the limit's tokens.
        """
        if chars > self.max_prompt_tokens * self.max_chars_per_token:
            raise fmt.APIError(
                400,
                f"{param}: {chars} characters, more than {self.max_prompt_tokens} tokens can hold",
                param=param,
                code="context_length_exceeded",
            )

    async def encode(self, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt, computed in a worker thread: a long prompt never stalls the event loop."""
        self._check_chars(len(text), param)
        return list(
            await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        )

    async def decode(self, ids: list[int]) -> str:
        """The text of token ids (special tokens skipped), decoded in a worker thread."""
        return str(await asyncio.to_thread(self.tokenizer.decode, ids, skip_special_tokens=True))

    async def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        """`openai_format.render_chat` in a worker thread (chat templates and tokenizing take time)."""
        self._check_chars(sum(len(m.text()) for m in messages), "messages")
        return await asyncio.to_thread(fmt.render_chat, self.model, messages, add_generation_prompt)

    async def admit(self, jobs: list[Job]) -> None:
        """Take a slot per job (429 when too few are free) and queue them in the engine (400 if it refuses).

        `jobs` are one prompt's choices (one `group`): several share the
        prompt's blocks (`AsyncEngine.add_parallel`). Call before the response
        starts, so that a refused request gets its status code; `run` then
        streams each job and `release` gives its slot back.
        """
        for taken in range(len(jobs)):
            try:
                self.acquire()
            except fmt.APIError:
                for _ in range(taken):
                    self.release()
                raise
        try:
            with as_400():
                ids = await add_jobs(self.llm, jobs)
        except RuntimeError:
            for _ in jobs:
                self.release()
            if self.llm.state == "running":
                raise
            # The engine's driver is closed or has failed: no request can run here.
            raise fmt.APIError(503, f"the engine is {self.llm.state}", "server_error") from None
        except BaseException:
            for _ in jobs:
                self.release()
            raise
        for job, seq_id in zip(jobs, ids, strict=True):
            job.seq_id = seq_id

    async def admit_all(self, jobs: list[Job]) -> None:
        """`admit` each prompt's jobs, in order; if one is refused, the ones admitted are aborted and released."""
        admitted: list[Job] = []
        try:
            for group in _groups(jobs):
                await self.admit(group)
                admitted.extend(group)
        except BaseException:
            for job in admitted:
                assert job.seq_id is not None
                self.llm.abort(job.seq_id)
                self.release()
            raise

    async def run(self, job: Job) -> AsyncGenerator[tuple[str, str | None], None]:
        """(new text, finish reason or None) of an admitted job as it runs; closing it aborts the request."""
        assert job.seq_id is not None, "admit the job first"
        info = self.llm.info(job.seq_id)  # outlives the request: read once it has ended
        text = TextStream(self.tokenizer, job.params.stop, job.params.min_tokens)
        timer = self.metrics.timer(job.arrival)
        ids = job.output_ids
        ran_to_end = False
        try:
            async with contextlib.aclosing(self.llm.stream(job.seq_id)) as events:
                async for event in events:
                    if event.token_id is not None:  # None: a prompt scored, nothing generated
                        timer.token()
                        ids.append(event.token_id)
                    if event.logprob is not None:
                        job.logprobs.append(event.logprob)
                    if event.prompt_logprobs is not None:
                        job.prompt_logprobs = event.prompt_logprobs
                    job.num_completion = len(ids)
                    delta = text.update(ids, event.finished)
                    if text.stopped or event.finished:  # a stop string ends it early: the stream aborts
                        ran_to_end = True
                        yield delta, "stop" if text.stopped else event.finish_reason or "stop"
                        return
                    if delta:
                        yield delta, None
            # Ended without a last token: aborted. Its client is still reading, so no disconnect
            # did it: the engine was closed under it (the end of a shutdown's grace period).
            if self.llm.state != "running":
                raise fmt.APIError(
                    503, "the server shut down before the request finished", "server_error", code="shutdown"
                )
            yield "", "abort"
        finally:
            job.num_cached = info.num_cached_tokens
            timer.end(job.num_completion, ran_to_end)

    async def drain(self, grace_s: float) -> int:
        """Shut down gently: refuse new requests, give those in flight `grace_s` to finish, end the rest.

        From the call on, new completion requests get 503 and /ready says so.
        The requests still in flight after `grace_s` are aborted by closing
        the engine's driver: a stream then ends with an error event and
        `data: [DONE]`, a non-streaming request with a 503. Returns once every
        response is out (or a few seconds later, for clients too slow to take
        them), with the number of requests it ended. The caller closes the
        engine afterwards (the app's lifespan does, which flushes the tiers).
        """
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.num_in_flight and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        num_ended = self.num_in_flight
        await self.llm.close()  # aborts what is left; no step runs after this
        deadline = loop.time() + _ENDING_S
        while self.num_in_flight and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        return num_ended

    def acquire(self) -> None:
        """Take one of `max_concurrent_requests` (429 when all are taken); `release` gives it back.

        503 once the server is draining (`drain`).
        """
        if self.draining:
            raise fmt.APIError(
                503, "the server is shutting down; retry on another one", "server_error", code="shutdown"
            )
        if self.num_in_flight >= self.config.max_concurrent_requests:
            raise fmt.APIError(
                429, f"{self.num_in_flight} requests in flight, the limit; retry later", "rate_limit_error"
            )
        self.num_in_flight += 1

    def release(self) -> None:
        self.num_in_flight -= 1


def _longest_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token covers (its vocabulary's longest entry).

    Without a vocabulary to read (a custom tokenizer), 1 << 20: no bound in practice.
    """
    try:
        vocab = tokenizer.get_vocab()
        return 2 * max(16, max(len(str(t)) for t in vocab))  # 2x: normalizers may drop characters
    except Exception:
        return 1 << 20


def _groups(jobs: list[Job]) -> list[list[Job]]:
    """`jobs` cut into runs of one prompt's choices (the same `group`), in order."""
    out: list[list[Job]] = []
    for job in jobs:
        if out and out[-1][0].group == job.group:
            out[-1].append(job)
        else:
            out.append([job])
    return out
