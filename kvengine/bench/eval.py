"""`kvengine eval`: task accuracy, KV bytes held and time, per press, ratio and KIVI width.

Each context is prefilled once with its queries kept; every press compresses
its own copy of that cache (`Engine.compress_context`, the same cache inline
compression gives) and all of the context's questions are asked of that copy,
after it is compressed: query-agnostic, as kvpress evaluates. KIVI widths
prefill their own engine, whose pool stores packed blocks, with no press.

Every result is one JSON row appended (and flushed) as soon as it is known,
keyed by (task, length, example, press, ratio, kivi); a run started again on
the same file skips the keys already there, so an interrupted run resumes
where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvengine.argtypes import name_list, positive_int, positive_int_list, ratio_list
from kvengine.bench.report import append_rows, make_row
from kvengine.bench.tasks import (
    Example,
    default_depth,
    expand_task_names,
    load_jsonl_tasks,
    make_example,
    score,
)
from kvengine.config import DEFAULT_MODEL, CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.generate import encode_prompt
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel, load
from kvengine.press import press_from_spec

Key = tuple[str, int, int, str, float, int]  # (task, length, example, press, ratio, kivi)
_KEY_FIELDS = ("task", "length", "example", "press", "ratio", "kivi")


@dataclass(frozen=True)
class EvalConfig:
    """What `run_eval` measures: every task x length x example, under every setting.

    `tasks` holds task names, "ruler" (all RULER tasks) or paths of JSONL task
    files (their examples ignore `lengths`). Press "none" runs once, at ratio 0;
    every other press runs at every ratio; each KIVI width runs without press.
    """

    tasks: tuple[str, ...] = ("ruler",)
    lengths: tuple[int, ...] = (1024, 2048)
    presses: tuple[str, ...] = ("none", "snapkv", "knorm")
    ratios: tuple[float, ...] = (0.25, 0.5)
    kivi: tuple[int, ...] = ()
    num_examples: int = 2
    seed: int = 0
    max_new_tokens: int = 32
    chat: bool | None = None  # None: the chat template when the model has one

    def __post_init__(self) -> None:
        if not self.tasks or not self.presses or not self.lengths:
            raise InvalidRequestError("tasks, lengths and presses must each name at least one")
        expand_task_names([t for t in self.tasks if not t.endswith(".jsonl")])
        if any(n < 1 for n in self.lengths):
            raise InvalidRequestError(f"lengths must be >= 1, got {self.lengths}")
        if not self.ratios or not all(0.0 <= r < 1.0 for r in self.ratios):
            raise InvalidRequestError(f"ratios must be in [0, 1), got {self.ratios}")
        if any(b not in (2, 4, 8) for b in self.kivi):
            raise InvalidRequestError(f"KIVI bit widths are 2, 4 or 8, got {self.kivi}")
        if self.num_examples < 1 or self.max_new_tokens < 1:
            raise InvalidRequestError("num_examples and max_new_tokens must be >= 1")
        for spec in self.presses:
            if spec != "none":
                press_from_spec(spec, self.ratios[0])  # bad names fail before any prefill

    def settings(self) -> list[tuple[str, float, int]]:
        """(press, ratio, kivi) of every run an example gets, in run order."""
        out: list[tuple[str, float, int]] = []
        for spec in self.presses:
            out += [("none", 0.0, 0)] if spec == "none" else [(spec, r, 0) for r in self.ratios]
        return out + [("none", 0.0, bits) for bits in self.kivi]


def row_key(row: Mapping[str, Any]) -> Key:
    """The key of a result row (its `config` fields)."""
    c = row["config"]
    return (
        str(c["task"]),
        int(c["length"]),
        int(c["example"]),
        str(c["press"]),
        float(c["ratio"]),
        int(c["kivi"]),
    )


def done_keys(path: Path) -> set[Key]:
    """Keys of the rows already in `path` (none if it does not exist).

    A last line cut short by an interrupted write is dropped, and the file is
    made to end with a newline, so appended rows stay one per line.
    """
    if not path.exists():
        return set()
    text = path.read_text(encoding="utf-8")
    keys: set[Key] = set()
    for line in text.splitlines():
        try:
            row = json.loads(line)
            keys.add(row_key(row))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a torn line, or a row of another benchmark
    if text and not text.endswith("\n"):
        with path.open("a", encoding="utf-8") as f:
            f.write("\n")
    return keys


@dataclass(frozen=True)
class _Planned:
    task: str
    length: int
    index: int
    depth: float | None
    jsonl: Example | None  # a user's example; synthetic ones are generated when needed


def _plan(cfg: EvalConfig, model: LoadedModel) -> list[_Planned]:
    planned: list[_Planned] = []
    for name in cfg.tasks:
        if name.endswith(".jsonl"):
            examples = load_jsonl_tasks(Path(name), model.tokenizer)
            planned += [_Planned(e.task, e.length, i, None, e) for i, e in enumerate(examples)]
            continue
        for task in expand_task_names([name]):
            for length in cfg.lengths:
                for i in range(cfg.num_examples):
                    planned.append(_Planned(task, length, i, default_depth(i, cfg.num_examples), None))
    return planned


def _example(model: LoadedModel, cfg: EvalConfig, p: _Planned) -> Example:
    if p.jsonl is not None:
        return p.jsonl
    assert model.tokenizer is not None and p.depth is not None
    return make_example(p.task, model.tokenizer, p.length, cfg.seed, p.index, p.depth, model.max_context_len)


def run_eval(model: LoadedModel, cfg: EvalConfig, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Run every (example, setting) whose key is not yet in `out`; returns the rows it appended."""
    if model.tokenizer is None:
        raise InvalidRequestError(f"model {model.name!r} has no tokenizer; eval tasks are text")
    too_long = [n for n in cfg.lengths if n + cfg.max_new_tokens > model.max_context_len]
    if too_long and any(not t.endswith(".jsonl") for t in cfg.tasks):
        raise InvalidRequestError(
            f"context length {too_long[0]} (+{cfg.max_new_tokens} new tokens) is beyond "
            f"model {model.name!r}'s context of {model.max_context_len} tokens"
        )
    planned, settings, done = _plan(cfg, model), cfg.settings(), done_keys(out)
    todo = [(p, [s for s in settings if (p.task, p.length, p.index, *s) not in done]) for p in planned]
    total = len(planned) * len(settings)
    bar = tqdm(
        total=total,
        initial=total - sum(len(s) for _, s in todo),
        unit="run",
        desc="eval",
        disable=not progress,
    )
    rows: list[dict[str, Any]] = []
    with bar:
        for p, pending in todo:
            if not pending:
                continue
            bar.set_postfix_str(f"{p.task} @{p.length} #{p.index}")
            for row in evaluate_example(model, _example(model, cfg, p), p.index, pending, cfg):
                append_rows(out, [row])
                rows.append(row)
                bar.update(1)
    return rows


def _run(engine: Engine) -> None:
    while engine.has_unfinished():
        engine.step()


def _prefill(engine: Engine, ids: list[int], keep_queries: bool) -> tuple[int, float]:
    start = time.perf_counter()
    context = engine.add_context(ids, keep_queries=keep_queries)
    _run(engine)
    return context, time.perf_counter() - start


def _ask(
    engine: Engine, model: LoadedModel, context: int, rests: list[list[int]], params: SamplingParams
) -> tuple[list[str], float]:
    """Every question continues `context` (batched together); returns the answers and the seconds taken."""
    start = time.perf_counter()
    seq_ids = [engine.add_request(rest, params, parent=context) for rest in rests]
    _run(engine)
    assert model.tokenizer is not None
    outputs = [
        str(model.tokenizer.decode(engine.release(s).output_ids, skip_special_tokens=True)) for s in seq_ids
    ]
    return outputs, time.perf_counter() - start


def _engine(
    model: LoadedModel, num_questions: int, num_tokens: int, extra_tokens: int, kv_bits: int = 0
) -> Engine:
    """An engine for one context of `num_tokens` and `num_questions` continuations of `extra_tokens`."""
    scheduler = SchedulerConfig(max_num_seqs=max(4, num_questions), max_step_tokens=num_tokens)
    if not kv_bits:
        return Engine(model, CacheConfig(), scheduler)  # fp pools are allocated lazily: the default is free
    # A packed pool is laid out up front, so it is sized for this example: twice its fp bytes, with a
    # partly filled block per (layer, kv-head) cell for each sequence. 32-token blocks: one key group
    # per block, as in KIVI (and `kvengine bench presses`).
    block_size, cells = 32, model.num_layers * model.num_kv_heads
    tokens = num_tokens + num_questions * extra_tokens + (num_questions + 1) * block_size
    fp_bytes = 2 * tokens * cells * model.head_dim * torch.empty((), dtype=model.dtype).element_size()
    return Engine(
        model, CacheConfig(block_size=block_size, max_kv_bytes=2 * fp_bytes, kv_bits=kv_bits), scheduler
    )


def evaluate_example(
    model: LoadedModel, example: Example, index: int, settings: list[tuple[str, float, int]], cfg: EvalConfig
) -> Iterator[dict[str, Any]]:
    """One row per (press, ratio, kivi) setting of one example, yielded as each is measured.

    The context is prefilled once for all fp settings; each press compresses a
    copy. Row values: `value` is the mean score over the questions; `kv_bytes`
    what the pool holds for the (compressed) context, `kv_bytes_full` the
    uncompressed fp cache; times in seconds (`answer_s` for all questions).
    """
    parts = [encode_prompt(model, example.context, cfg.chat, None, q.text) for q in example.questions]
    ids, rests = parts[0][0], [rest for _, rest in parts]
    extra = max(len(r) for r in rests) + cfg.max_new_tokens  # tokens a question adds to the context
    longest = len(ids) + extra
    if longest > model.max_context_len:
        raise InvalidRequestError(
            f"{example.task} example {index}: {longest} tokens with question and answer, beyond "
            f"model {model.name!r}'s context of {model.max_context_len}"
        )
    params = SamplingParams(max_tokens=cfg.max_new_tokens)
    engine = _engine(model, len(rests), len(ids), extra)
    base, prefill_s = _prefill(engine, ids, keep_queries=any(s[0] != "none" for s in settings))
    full = engine.cache.bytes_held(engine.sequences[base].kv)  # type: ignore[arg-type]
    row = _RowMaker(model, example, index, cfg, full)
    for spec, ratio, bits in settings:
        if bits:
            continue
        start, context = time.perf_counter(), base
        if spec != "none":
            context = engine.compress_context(base, press_from_spec(spec, ratio))
        compress_s = time.perf_counter() - start if spec != "none" else 0.0
        held = engine.cache.bytes_held(engine.sequences[context].kv)  # type: ignore[arg-type]
        outputs, answer_s = _ask(engine, model, context, rests, params)
        if context != base:
            engine.release(context)
        yield row(spec, ratio, 0, outputs, held, prefill_s, compress_s, answer_s)
    engine.release(base)
    for bits in sorted({s[2] for s in settings if s[2]}):
        kivi_engine = _engine(model, len(rests), len(ids), extra, bits)
        context, kivi_prefill_s = _prefill(kivi_engine, ids, keep_queries=False)
        held = kivi_engine.cache.bytes_held(kivi_engine.sequences[context].kv)  # type: ignore[arg-type]
        outputs, answer_s = _ask(kivi_engine, model, context, rests, params)
        yield row("none", 0.0, bits, outputs, held, kivi_prefill_s, 0.0, answer_s)


@dataclass
class _RowMaker:
    """Builds the result rows of one example (what stays the same across its settings)."""

    model: LoadedModel
    example: Example
    index: int
    cfg: EvalConfig
    kv_bytes_full: int

    def __call__(
        self,
        press: str,
        ratio: float,
        kivi: int,
        outputs: list[str],
        kv_bytes: int,
        prefill_s: float,
        compress_s: float,
        answer_s: float,
    ) -> dict[str, Any]:
        ex = self.example
        scores = [score(q.answers, out) for q, out in zip(ex.questions, outputs, strict=True)]
        config = dict(zip(_KEY_FIELDS, (ex.task, ex.length, self.index, press, ratio, kivi), strict=True))
        row = make_row(
            "eval", "score", sum(scores) / len(scores), "fraction",
            **config, depth=ex.depth, model=self.model.name, seed=self.cfg.seed,
        )  # fmt: skip
        row.update(
            num_tokens=ex.num_tokens,
            num_questions=len(scores),
            scores=scores,
            outputs=outputs,
            kv_bytes=kv_bytes,
            kv_bytes_full=self.kv_bytes_full,
            prefill_s=prefill_s,
            compress_s=compress_s,
            answer_s=answer_s,
        )
        return row


def _kivi_list(text: str) -> list[int]:
    return [] if text.strip() == "none" else positive_int_list(text)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """`kvengine eval --tasks ruler --lengths 1024,2048 --presses none,snapkv --ratios 0.25,0.5 [--kivi 2]`."""
    ev = sub.add_parser(
        "eval",
        help="task accuracy, KV bytes and time per press (RULER-style tasks or your JSONL)",
        description="Prefill each example's context once, compress a copy with every press at every ratio, ask "
        "all its questions of that copy, and append one JSON row per (task, length, example, press, ratio, "
        "kivi) to --out. Rows already in --out are skipped, so a stopped run resumes. "
        "`kvengine report OUT` renders the table and plots.",
    )
    ev.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    ev.add_argument(
        "--tasks",
        type=name_list,
        default=["ruler"],
        help="task names, 'ruler' (all) or paths of .jsonl task files",
    )
    ev.add_argument(
        "--lengths", type=positive_int_list, default=[1024, 2048], help="context lengths in tokens"
    )
    ev.add_argument(
        "--presses", type=name_list, default=["none", "snapkv", "knorm"], help="press specs, or none"
    )
    ev.add_argument("--ratios", type=ratio_list, default=[0.25, 0.5], help="compression ratios")
    ev.add_argument("--kivi", type=_kivi_list, default=[], help="KIVI bit widths (2, 4, 8) to run, or none")
    ev.add_argument("--examples", type=positive_int, default=2, help="examples per task and length")
    ev.add_argument("--seed", type=int, default=0, help="seed of the generated examples")
    ev.add_argument("--max-tokens", type=positive_int, default=32, help="answer tokens at most")
    ev.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    ev.add_argument("--out", default="docs/results/eval.jsonl", help="JSON rows are appended here")


def run_eval_command(args: argparse.Namespace) -> None:
    cfg = EvalConfig(
        tuple(args.tasks),
        tuple(args.lengths),
        tuple(args.presses),
        tuple(args.ratios),
        tuple(args.kivi),
        args.examples,
        args.seed,
        args.max_tokens,
        False if args.no_chat else None,
    )
    rows = run_eval(load(args.model), cfg, Path(args.out))
    print(f"{len(rows)} rows appended to {args.out}; `kvengine report {args.out}` renders them")
