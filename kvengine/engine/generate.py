"""`kvengine.generate`: text in, text out, through the engine.

This is the text side the engine leaves out: chat templates, tokenization,
incremental detokenization for streaming and stop strings (`TextStream`, which
the HTTP server uses too). A prompt may be a string (the chat template is
applied when the model has one, unless `chat=False`) or a list of token ids
(used as given).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press.base import Press

Prompt = str | Sequence[int]
OnText = Callable[[int, str], None]  # (prompt index, new text)


@dataclass(frozen=True)
class Completion:
    """One prompt's result with what it cost."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length", "abort"
    num_prompt_tokens: int
    ttft_s: float  # time to first token, from submission
    decode_tokens_per_s: float  # generated tokens after the first, per second
    kv_bytes: int  # bytes its KV blocks held when it finished


class Detokenizer:
    """The text of a growing list of output token ids, decoded incrementally.

    `step(new_ids)` returns the text those ids complete (maybe "", while a
    character spans tokens); `finish(all_ids)` returns the rest. The pieces
    joined equal `tokenizer.decode(all_ids, skip_special_tokens=True)`:
    `finish` decodes the whole output once and returns what the steps have not
    shown. A step costs the same whatever the output's length: a fast
    tokenizer that adds no clean-up on decode is driven through tokenizers'
    `DecodeStream`; any other is decoded over a window of the last few tokens
    (from the last token already shown), as vLLM does.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.text = ""  # everything returned so far
        self.ids: list[int] = []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        exact = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._backend = cast(Tokenizer, backend)  # used only when `exact`
        self._stream = DecodeStream(skip_special_tokens=True) if exact else None
        self._prefix = 0  # window decoding: ids[_prefix:_read] decode to text already returned
        self._read = 0

    def step(self, new_ids: list[int]) -> str:
        self.ids += new_ids
        if self._stream is not None:
            pieces = [self._stream.step(self._backend, t) for t in new_ids]
            delta = "".join(p for p in pieces if p)
        else:
            delta = self._window_step()
        self.text += delta
        return delta

    def _window_step(self) -> str:
        shown = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) <= len(shown) or text.endswith("\ufffd"):  # nothing new, or half a character
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(shown) :]

    def finish(self, all_ids: list[int]) -> str:
        self.ids = list(all_ids)
        full = self._decode(self.ids)
        rest = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += rest
        return rest

    def _decode(self, ids: list[int]) -> str:
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))


class TextStream:
    """One request's text for streaming: incremental detokenization with stop strings.

    Feed `update` every output token id so far, after each new token; it
    returns the text that became final since the last call. Each call decodes
    only the new ids (`Detokenizer`), so its cost does not grow with the
    output. What it returns never ends in half a UTF-8 character and never
    holds a stop string or the start of one (such text is held back until the
    next token settles it). Once a stop string appears, `stopped` is set,
    `text` ends just before it, and the caller should end the request: nothing
    after it is ever shown. Stop strings are looked for only from the
    `min_tokens`-th token on (what completes one before then does not stop it). `final=True` (the request's last token) releases
    whatever is held back.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = (), min_tokens: int = 0
    ) -> None:
        self.detokenizer = Detokenizer(tokenizer)
        self.stop = stop
        self.min_tokens = min_tokens  # stop strings count only once this many tokens are out
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # everything decoded so far, cut before a stop string
        self.emitted = 0  # characters of `text` returned so far
        self.stopped = False

    def update(self, token_ids: list[int], final: bool) -> str:
        """Feed all output ids so far; returns the new text that is safe to show."""
        detok = self.detokenizer
        if final:
            detok.finish(token_ids)
        else:
            detok.step(token_ids[len(detok.ids) :])
        text = detok.text
        for s in self.stop if len(token_ids) >= self.min_tokens else ():
            cut = text.find(s, max(0, self.emitted - len(s)))
            if cut != -1:
                text, final, self.stopped = text[:cut], True, True
        self.text = text
        end = len(text) if final else max(self.emitted, len(text) - self.holdback)
        if not final and text[self.emitted : end].endswith("\ufffd"):
            return ""
        delta = text[self.emitted : end]
        self.emitted = end
        return delta


_MARK = "<<kvengine:question>>"  # where the question goes in a rendered chat template


def encode_prompt(
    model: LoadedModel, prompt: Prompt, chat: bool | None, system: str | None, question: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of one prompt, split into (context, rest).

    The context is what a query-agnostic press compresses: the prompt with
    the chat template's opening. The rest is the question (if any) and the
    template's closing up to the assistant's turn, which is never compressed.
    Token-id prompts are used as given (all context).
    """
    if not isinstance(prompt, str):
        if question is not None:
            raise InvalidRequestError("questions need text prompts")
        return list(prompt), []
    if not prompt.strip():
        raise InvalidRequestError("the prompt is empty")
    if question is not None and not question.strip():
        raise InvalidRequestError("a question is empty")
    tok = model.tokenizer
    if tok is None:
        raise InvalidRequestError("this model has no tokenizer; pass prompts as token ids")
    use_chat = model.has_chat_template if chat is None else chat
    if use_chat and not model.has_chat_template:
        raise InvalidRequestError(f"model {model.name!r} has no chat template; use chat=False")
    question_text = "" if question is None else "\n\n" + question
    if not use_chat:
        rest = tok.encode(question_text, add_special_tokens=False) if question_text else []
        return list(tok.encode(prompt)), list(rest)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt + _MARK})
    text = str(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    head, tail = text.split(_MARK)
    return list(tok.encode(head, add_special_tokens=False)), list(
        tok.encode(question_text + tail, add_special_tokens=False)
    )


def generate(
    model: LoadedModel,
    prompts: Prompt | Sequence[Prompt],
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chat: bool | None = None,
    system: str | None = None,
    press: Press | None = None,
    questions: Sequence[str] | None = None,
    query_aware: bool = False,
    on_text: OnText | None = None,
    cache_config: CacheConfig | None = None,
    scheduler_config: SchedulerConfig | None = None,
) -> list[Completion]:
    """Generate a completion for each prompt, all prompts batched in one engine.

    Greedy by default (`temperature=0`). `seed` seeds each sampled request on
    its own. `on_text(i, text)` receives completion i's text as it is produced.

    `press` compresses each prompt's context once it is cached. Without
    `questions`, the context is the whole prompt (only the chat template's
    closing is left out). With `questions`, each prompt is a context asked
    every question: one completion per (prompt, question), prompt-major; the
    context is compressed once, before any question is seen, and shared by
    its questions (query-agnostic, as kvpress evaluates), unless
    `query_aware=True`, which compresses context and question together for
    each question.
    """
    batch = _as_batch(prompts)
    params = SamplingParams(max_tokens, temperature, top_p, top_k, seed, tuple(stop))
    if params.stop and model.tokenizer is None:
        raise InvalidRequestError("stop strings need a tokenizer")
    if questions is not None and not questions:
        raise InvalidRequestError("questions is empty")
    engine = Engine(model, cache_config, scheduler_config)
    ids, contexts = _add_requests(engine, model, batch, params, chat, system, press, questions, query_aware)
    index = {seq_id: i for i, seq_id in enumerate(ids)}
    streams = {i: TextStream(model.tokenizer, params.stop) for i in ids} if model.tokenizer else {}
    while engine.has_unfinished():
        events = engine.step()
        if engine.step_errors:
            raise next(iter(engine.step_errors.values()))
        for event in events:
            stream = streams.get(event.seq_id)
            if stream is None:
                continue
            delta = stream.update(engine.sequences[event.seq_id].output_ids, event.finished)
            if stream.stopped and not event.finished:
                engine.abort(event.seq_id)
            if on_text and delta:
                on_text(index[event.seq_id], delta)
    for context_id in contexts:
        engine.release(context_id)
    return [_completion(engine, i, seq_id, streams.get(seq_id)) for i, seq_id in enumerate(ids)]


def _add_requests(
    engine: Engine,
    model: LoadedModel,
    batch: list[Prompt],
    params: SamplingParams,
    chat: bool | None,
    system: str | None,
    press: Press | None,
    questions: Sequence[str] | None,
    query_aware: bool,
) -> tuple[list[int], list[int]]:
    """Queue every completion's request; returns their ids in completion order, and the contexts' ids."""
    ids, contexts = [], []
    for prompt in batch:
        asked: Sequence[str | None] = questions if questions is not None else [None]
        parts = [encode_prompt(model, prompt, chat, system, q) for q in asked]
        if press is not None and questions is not None and not query_aware:
            context = engine.add_context(parts[0][0], press)
            contexts.append(context)
            ids += [engine.add_request(rest, params, parent=context) for _, rest in parts]
            continue
        for context_ids, rest in parts:
            context_len = len(context_ids) + (len(rest) if query_aware else 0)
            ids.append(engine.add_request(context_ids + rest, params, press=press, context_len=context_len))
    return ids, contexts


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """A list of prompts from one prompt (text or token ids) or a sequence of them."""
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if not items:
        raise InvalidRequestError("no prompts given")
    if all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _completion(engine: Engine, index: int, seq_id: int, stream: TextStream | None) -> Completion:
    seq = engine.release(seq_id)
    first = seq.first_token_time or seq.arrival_time
    end = seq.finish_time or first
    decode_tps = (len(seq.output_ids) - 1) / (end - first) if end > first else 0.0
    reason = "stop" if stream is not None and stream.stopped else seq.finish_reason or "stop"
    return Completion(
        index=index,
        text=stream.text if stream is not None else "",
        token_ids=list(seq.output_ids),
        finish_reason=reason,
        num_prompt_tokens=len(seq.prompt_ids),
        ttft_s=first - seq.arrival_time,
        decode_tokens_per_s=decode_tps,
        kv_bytes=seq.kv_bytes,
    )
