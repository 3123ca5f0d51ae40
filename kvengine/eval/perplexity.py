"""`kvengine bench perplexity`: teacher-forced perplexity of a long text whose context is compressed.

The protocol, one and fixed: the text's first `context_len` tokens are the
context. They are prefilled and compressed once, query-agnostically, by the
press at its ratio (`Engine.add_context(ids, press)`, as kvpress compresses a
context before the question). The next `score_len` tokens are then fed,
teacher-forced, as one request continuing that compressed context, and each
of them predicts the token after it: `score_len` predictions, every one made
by a forward pass that attends to the compressed cache (and to the
continuation before it). Perplexity is exp of their mean cross-entropy. With
press "none" and full-precision storage this is the full-forward perplexity
of text tokens `context_len + 1 .. context_len + score_len` (tested against
transformers within 1e-4). KIVI (`kivi` bits) is the cache's storage, so it
composes with any press: the press chooses from full-precision keys, then
what stays is packed. In a run, the full-precision settings of one length
share one prefill (each press compresses its own copy, as `kvengine eval`
does); each KIVI setting prefills its own packed cache.

The engine returns the logits of a request's last prompt token only, so the
logits of every continuation token are computed here from the decoder's
final hidden states (a forward hook on the decoder, removed in `finally`)
through the model's output embedding: what the model's head computes for the
families of the adapter table, none of which post-processes logits.

It is not a sliding-window perplexity of a corpus, nor compression while
decoding. The text is the "prose" haystack (needs its package) or the
"noise" one, from a seed-chosen offset.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.eval.tasks.haystack import HAYSTACKS, haystack_builder
from kvengine.models import LoadedModel
from kvengine.press import press_from_spec
from kvengine.press.base import Press
from kvengine.results import append_rows, make_row, markdown_table

Setting = tuple[str, float, int]  # (press, ratio, kivi bits; 0 = full precision)
KIVI_BLOCK_SIZE = 32  # one KIVI key group per block; 16 would double the key scales


@dataclass(frozen=True)
class PerplexityConfig:
    """What `run_perplexity` measures: every context length under every setting.

    Press "none" runs once, at ratio 0; every other press at every ratio;
    each KIVI width repeats all of these with a packed cache. `text` names
    the haystack the text comes from; `seed` chooses where it starts.
    `kv_rotate` and `kv_key_groups` shape the packed blocks of the KIVI runs
    (`CacheConfig`).
    """

    lengths: tuple[int, ...] = (1024, 2048)
    presses: tuple[str, ...] = ("none", "knorm", "streaming_llm", "snapkv")
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    kivi: tuple[int, ...] = ()
    score_len: int = 256
    text: str = "prose"
    seed: int = 0
    kv_rotate: bool = False
    kv_key_groups: str = "channel"

    def __post_init__(self) -> None:
        if not self.lengths or not self.presses:
            raise InvalidRequestError("lengths and presses must each name at least one")
        if any(n < 1 for n in self.lengths) or self.score_len < 1:
            raise InvalidRequestError(
                f"lengths and score_len must be >= 1, got {self.lengths}, {self.score_len}"
            )
        if not self.ratios or not all(0.0 <= r < 1.0 for r in self.ratios):
            raise InvalidRequestError(f"ratios must be in [0, 1), got {self.ratios}")
        if any(b not in (2, 3, 4, 8) for b in self.kivi):
            raise InvalidRequestError(f"KIVI bit widths are 2, 3, 4 or 8, got {self.kivi}")
        CacheConfig(kv_bits=2, **self.storage)  # bad storage options fail here
        if self.text not in HAYSTACKS:
            raise InvalidRequestError(f"unknown text {self.text!r}; known texts: {', '.join(HAYSTACKS)}")
        for spec in self.presses:
            if spec != "none":
                press_from_spec(spec, self.ratios[0])  # bad names fail before any prefill

    @property
    def storage(self) -> dict[str, Any]:
        """The `CacheConfig` options of the KIVI runs' packed pools, besides the width."""
        return {"kv_rotate": self.kv_rotate, "kv_key_groups": self.kv_key_groups}

    def settings(self) -> list[Setting]:
        """(press, ratio, kivi) of every run at one length; the full-precision "none" comes first."""
        presses = [(s, r) for s in self.presses if s != "none" for r in self.ratios]
        return [(p, r, bits) for bits in (0, *self.kivi) for p, r in [("none", 0.0), *presses]]


@dataclass(frozen=True)
class Measured:
    """One perplexity measurement: the scored tokens' mean loss and what the context's cache held."""

    perplexity: float
    mean_nll: float
    num_scored: int
    kv_bytes: int  # bytes the pool holds for the compressed context
    seconds: float  # prefill + compression + scoring


def text_ids(model: LoadedModel, text: str, num_tokens: int, seed: int) -> list[int]:
    """The first `num_tokens` token ids of haystack `text` from a `seed`-chosen start (no special tokens)."""
    if model.tokenizer is None:
        raise InvalidRequestError(f"model {model.name!r} has no tokenizer; perplexity texts are text")
    build = haystack_builder(text, random.Random(f"perplexity:{seed}"))
    num_words = num_tokens
    while True:  # a word is at least one token, mostly: grow until the text is long enough
        ids = list(model.tokenizer.encode(build(num_words, []), add_special_tokens=False))
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
        num_words *= 2


@contextlib.contextmanager
def _final_hidden_states(model: LoadedModel) -> Iterator[list[torch.Tensor]]:
    """Collects the decoder's final hidden states `(n, hidden)` of every forward pass inside the block."""
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        captured.append(hidden[0].detach())

    handle = model.hf_model.get_decoder().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _check_fits(model: LoadedModel, ids: list[int], context_len: int) -> None:
    if context_len < 1 or len(ids) - context_len - 1 < 1:
        raise InvalidRequestError(
            f"{len(ids)} tokens leave nothing to score after a context of {context_len}"
        )
    if len(ids) > model.max_context_len:
        raise InvalidRequestError(
            f"{len(ids)} tokens are beyond model {model.name!r}'s context of {model.max_context_len}"
        )


def _engine(
    model: LoadedModel, ids: list[int], context_len: int, kivi: int, storage: dict[str, Any] | None = None
) -> Engine:
    cache = (
        CacheConfig(block_size=KIVI_BLOCK_SIZE, kv_bits=kivi, **(storage or {})) if kivi else CacheConfig()
    )
    # One step for the context and one for the scored tokens: a press sees the context whole.
    step_tokens = max(context_len, len(ids) - context_len)
    return Engine(model, cache, SchedulerConfig(max_num_seqs=2, max_step_tokens=step_tokens))


def _score(engine: Engine, context: int, ids: list[int], context_len: int) -> float:
    """Mean cross-entropy of `ids[context_len + 1:]`, fed teacher-forced after the cached `context`."""
    model = engine.model
    seq_id = engine.add_request(ids[context_len:-1], SamplingParams(max_tokens=1), parent=context)
    with _final_hidden_states(model) as captured:
        engine.run()
    engine.release(seq_id)
    hidden = torch.cat(captured)  # (score_len, hidden)
    if hidden.shape[0] != len(ids) - context_len - 1:
        raise RuntimeError(
            f"captured {hidden.shape[0]} hidden states for {len(ids) - context_len - 1} tokens"
        )
    with torch.inference_mode():
        logits = model.hf_model.get_output_embeddings()(hidden).float()  # (score_len, vocab)
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[context_len + 1 :])))


def _measured(
    engine: Engine, context: int, ids: list[int], context_len: int, seconds: float, release: bool = True
) -> Measured:
    """Score after `context` (then release it unless told not to); `seconds` is what making it took."""
    kv = engine.sequences[context].kv
    assert kv is not None
    kv_bytes = engine.cache.bytes_held(kv)
    start = time.perf_counter()
    nll = _score(engine, context, ids, context_len)
    if release:
        engine.release(context)
    return Measured(
        math.exp(nll), nll, len(ids) - context_len - 1, kv_bytes, seconds + time.perf_counter() - start
    )


def measure_perplexity(
    model: LoadedModel,
    ids: list[int],
    context_len: int,
    press: Press | None = None,
    kivi: int = 0,
    storage: dict[str, Any] | None = None,
) -> Measured:
    """Perplexity of `ids[context_len + 1:]` given `ids[:context_len]` compressed by `press` (see the module).

    `kivi` is the KIVI bit width of the cache (0: the model's dtype), `storage`
    more options of its packed blocks (`kv_rotate`, `kv_key_groups`). A fresh
    engine prefills the context with the press inline. Raises
    InvalidRequestError when the text does not fit the model's context or
    leaves nothing to score.
    """
    _check_fits(model, ids, context_len)
    engine = _engine(model, ids, context_len, kivi, storage)
    start = time.perf_counter()
    context = engine.add_context(ids[:context_len], press)
    engine.run()
    return _measured(engine, context, ids, context_len, time.perf_counter() - start)


def measure_settings(
    model: LoadedModel,
    ids: list[int],
    context_len: int,
    settings: list[Setting],
    storage: dict[str, Any] | None = None,
) -> Iterator[tuple[Setting, Measured]]:
    """`measure_perplexity` of every setting, yielded as each is measured.

    Full-precision settings share one prefill: each press compresses its own
    copy of the context (`Engine.compress_context`, the same cache as inline
    compression) and is timed as that prefill plus its compression and
    scoring. KIVI settings prefill their own engine each (a packed block
    cannot be shared and compressed later).
    """
    _check_fits(model, ids, context_len)
    engine = _engine(model, ids, context_len, 0)
    start = time.perf_counter()
    base = engine.add_context(ids[:context_len], keep_queries=True)
    engine.run()
    prefill_s = time.perf_counter() - start
    for spec, ratio, bits in settings:
        press = None if spec == "none" else press_from_spec(spec, ratio)
        if bits:
            yield (spec, ratio, bits), measure_perplexity(model, ids, context_len, press, bits, storage)
            continue
        if press is None:
            yield (spec, ratio, bits), _measured(engine, base, ids, context_len, prefill_s, release=False)
            continue
        start = time.perf_counter()
        copy = engine.compress_context(base, press)
        made_s = prefill_s + time.perf_counter() - start
        yield (spec, ratio, bits), _measured(engine, copy, ids, context_len, made_s)
    engine.release(base)


def run_perplexity(
    model: LoadedModel, cfg: PerplexityConfig, out: Path, progress: bool = True
) -> list[dict[str, Any]]:
    """Measure every (length, setting), append one JSON row each to `out`; returns the rows.

    Row `value` is the perplexity; `kv_bytes` what the context's cache holds,
    `kv_bytes_full` the full-precision uncompressed cache of the same length
    (the first, "none" run), `seconds` the run's wall time and `time_ratio`
    it over that of the "none" run (timings are noisy; ratios less so).
    """
    too_long = [n for n in cfg.lengths if n + cfg.score_len + 1 > model.max_context_len]
    if too_long:
        raise InvalidRequestError(
            f"context length {too_long[0]} (+{cfg.score_len + 1} scored) is beyond "
            f"model {model.name!r}'s context of {model.max_context_len} tokens"
        )
    settings, rows = cfg.settings(), []
    with tqdm(
        total=len(cfg.lengths) * len(settings), unit="run", desc="perplexity", disable=not progress
    ) as bar:
        for length in cfg.lengths:
            ids = text_ids(model, cfg.text, length + cfg.score_len + 1, cfg.seed)
            base: Measured | None = None
            for (spec, ratio, bits), m in measure_settings(model, ids, length, settings, cfg.storage):
                bar.set_postfix_str(f"@{length} {spec} {ratio} kivi={bits}")
                base = base or m
                row = make_row(
                    "perplexity", "perplexity", m.perplexity, "ppl", model=model.name, text=cfg.text,
                    seed=cfg.seed, length=length, score_len=cfg.score_len, press=spec, ratio=ratio, kivi=bits,
                    **(cfg.storage if bits else {}),
                )  # fmt: skip
                row.update(
                    mean_nll=m.mean_nll,
                    kv_bytes=m.kv_bytes,
                    kv_bytes_full=base.kv_bytes,
                    seconds=m.seconds,
                    time_ratio=m.seconds / base.seconds,
                )
                append_rows(out, [row])
                rows.append(row)
                bar.update(1)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """A table of the rows: perplexity, its change from "none", and the bytes held, per setting and length."""
    base = {
        r["config"]["length"]: r["value"]
        for r in rows
        if r["config"]["press"] == "none" and not r["config"]["kivi"]
    }
    table = []
    for r in rows:
        c = r["config"]
        storage = f"KIVI {c['kivi']}-bit" if c["kivi"] else "fp"
        storage += " rotated" if c.get("kv_rotate") else ""
        storage += " token-grouped keys" if c.get("kv_key_groups", "channel") != "channel" else ""
        change = r["value"] / base[c["length"]] - 1 if c["length"] in base else float("nan")
        held = r["kv_bytes"] / r["kv_bytes_full"]
        table.append(
            [c["length"], c["press"], c["ratio"], storage, f"{r['value']:.3f}", f"{change:+.1%}",
             f"{held:.3f}", f"{r['time_ratio']:.2f}"]
        )  # fmt: skip
    header = [
        "context",
        "press",
        "ratio",
        "storage",
        "perplexity",
        "vs none",
        "bytes held / full",
        "time / none",
    ]
    return markdown_table(header, table)
