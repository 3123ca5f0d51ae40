"""Request traces in Mooncake's format: loading, saving, and a synthetic generator.

One JSON object per line (Mooncake, FAST'25 trace release): `timestamp`
(ms), `input_length`, `output_length` (tokens) and `hash_ids`, one id per
512-token block of the prompt, the last one possibly partial. Two requests
share a hash id exactly where they share that block and everything before it.

A trace carries no tokens, so it drives the prefix cache without a model
(`kvengine.sim.replay`). This module knows nothing about caches.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvengine.errors import InvalidRequestError

BLOCK_TOKENS = 512  # tokens per hash id in Mooncake traces
_INT_FIELDS = ("input_length", "output_length")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: arrival time (ms), token counts and prompt block ids."""

    timestamp: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def to_json(self) -> str:
        row = {
            "timestamp": self.timestamp,
            "input_length": self.input_length,
            "output_length": self.output_length,
            "hash_ids": list(self.hash_ids),
        }
        return json.dumps(row)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_request(line: str) -> TraceRequest:
    """One trace line as a request; InvalidRequestError naming the bad field."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise InvalidRequestError(f"expected a JSON object, got {type(row).__name__}")
    for name in ("timestamp", *_INT_FIELDS, "hash_ids"):
        if name not in row:
            raise InvalidRequestError(f"missing field {name!r}")
    ts = row["timestamp"]
    if not (_is_int(ts) or isinstance(ts, float)) or not math.isfinite(ts) or ts < 0:
        raise InvalidRequestError(f"field 'timestamp' must be a number >= 0, got {ts!r}")
    for name in _INT_FIELDS:
        if not _is_int(row[name]) or row[name] < 0:
            raise InvalidRequestError(f"field {name!r} must be an integer >= 0, got {row[name]!r}")
    ids = row["hash_ids"]
    if not isinstance(ids, list) or not all(_is_int(h) and h >= 0 for h in ids):
        raise InvalidRequestError("field 'hash_ids' must be a list of integers >= 0")
    expected = math.ceil(row["input_length"] / BLOCK_TOKENS)
    if len(ids) != expected:
        raise InvalidRequestError(
            f"field 'hash_ids' has {len(ids)} ids but input_length {row['input_length']} "
            f"makes {expected} blocks of {BLOCK_TOKENS} tokens"
        )
    return TraceRequest(ts, row["input_length"], row["output_length"], tuple(ids))


def load_trace(path: str | Path) -> list[TraceRequest]:
    """The requests of a Mooncake-format JSONL file, in file order (blank lines skipped).

    Raises InvalidRequestError as `FILE:LINE: message` for the first bad line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequestError(f"cannot read trace {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidRequestError(f"trace {path} is not UTF-8 text") from None
    requests = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            requests.append(parse_request(line))
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{path}:{lineno}: {exc}") from None
    if not requests:
        raise InvalidRequestError(f"trace {path} has no requests")
    return requests


def save_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    """Write requests as Mooncake-format JSON lines (the folder is created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.to_json() + "\n" for r in requests), encoding="utf-8")


@dataclass(frozen=True)
class SyntheticTraceConfig:
    """A chat-and-documents workload with prefix reuse (token counts are means).

    Each request starts a new chat with probability `1 - multi_turn_prob`
    (one of `num_system_prompts` system prompts, a document with probability
    `doc_prob`, drawn with Zipf(`zipf_alpha`) popularity among
    `num_documents`, then a question), or else continues a random open chat:
    the previous prompt, its answer and a new question. A chat closes after
    `max_turns` turns; at most `max_open_chats` stay open. Arrivals are
    Poisson with `mean_interarrival_ms`. The same config gives the same trace.
    """

    num_requests: int = 2000
    seed: int = 0
    num_system_prompts: int = 4
    system_tokens: int = 1500
    num_documents: int = 200
    doc_prob: float = 0.7
    doc_tokens: int = 6000
    zipf_alpha: float = 1.0
    question_tokens: int = 300
    output_tokens: int = 250
    multi_turn_prob: float = 0.4
    max_turns: int = 6
    max_open_chats: int = 64
    mean_interarrival_ms: float = 250.0

    def __post_init__(self) -> None:
        counts = ["num_requests", "num_system_prompts", "system_tokens", "num_documents", "doc_tokens"]
        counts += ["question_tokens", "output_tokens", "max_turns", "max_open_chats"]
        for name in counts:
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("doc_prob", "multi_turn_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidRequestError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.zipf_alpha < 0:
            raise InvalidRequestError(f"zipf_alpha must be >= 0, got {self.zipf_alpha}")
        if not self.mean_interarrival_ms > 0:
            raise InvalidRequestError(f"mean_interarrival_ms must be > 0, got {self.mean_interarrival_ms}")


# A prompt is a list of segments (segment id, tokens); two prompts share a block
# exactly when they share every segment piece up to the block's end.
_Segment = tuple[int, int]


@dataclass
class _BlockIds:
    """Prefix-unique block ids: a block's id names its contents and its whole prefix."""

    ids: dict[tuple[int, tuple[Any, ...]], int] = field(default_factory=dict)

    def of(self, prompt: list[_Segment]) -> tuple[int, ...]:
        out: list[int] = []
        parent, pieces, filled = -1, [], 0
        for seg_id, seg_len in prompt:
            offset = 0
            while offset < seg_len:
                take = min(seg_len - offset, BLOCK_TOKENS - filled)
                pieces.append((seg_id, offset, take))
                offset, filled = offset + take, filled + take
                if filled == BLOCK_TOKENS:
                    parent = self._intern(parent, pieces, out)
                    pieces, filled = [], 0
        if pieces:
            self._intern(parent, pieces, out)
        return tuple(out)

    def _intern(self, parent: int, pieces: list[Any], out: list[int]) -> int:
        block = self.ids.setdefault((parent, tuple(pieces)), len(self.ids))
        out.append(block)
        return block


def generate_trace(config: SyntheticTraceConfig) -> list[TraceRequest]:
    """A deterministic synthetic trace (see `SyntheticTraceConfig`)."""
    rng = random.Random(config.seed)
    new_segment = itertools.count().__next__

    def length(mean: int) -> int:  # uniform in [mean / 2, 3 mean / 2]
        return max(1, round(mean * rng.uniform(0.5, 1.5)))

    systems = [(new_segment(), length(config.system_tokens)) for _ in range(config.num_system_prompts)]
    docs = [(new_segment(), length(config.doc_tokens)) for _ in range(config.num_documents)]
    doc_cum_weights = list(
        itertools.accumulate(1.0 / rank**config.zipf_alpha for rank in range(1, len(docs) + 1))
    )
    block_ids, t = _BlockIds(), 0.0
    chats: list[tuple[list[_Segment], int, _Segment]] = []  # (prompt, turns so far, its answer)
    requests = []
    for _ in range(config.num_requests):
        if chats and rng.random() < config.multi_turn_prob:
            prompt, turns, answer = chats.pop(rng.randrange(len(chats)))
            prompt = [*prompt, answer]
        else:
            prompt, turns = [rng.choice(systems)], 0
            if rng.random() < config.doc_prob:
                prompt.append(rng.choices(docs, cum_weights=doc_cum_weights)[0])
        prompt.append((new_segment(), length(config.question_tokens)))
        output_len = length(config.output_tokens)
        if turns + 1 < config.max_turns:
            chats.append((prompt, turns + 1, (new_segment(), output_len)))
            if len(chats) > config.max_open_chats:
                chats.pop(0)  # the oldest open chat is abandoned
        input_len = sum(n for _, n in prompt)
        requests.append(TraceRequest(round(t), input_len, output_len, block_ids.of(prompt)))
        t += rng.expovariate(1.0 / config.mean_interarrival_ms)
    return requests
