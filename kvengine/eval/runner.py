"""`kvengine eval`: task accuracy, KV bytes held and time, per press, ratio and KIVI width.

Plans the examples, runs kvengine on each (`kvengine.eval.measure`:
one prefill, a compressed copy per press, questions asked after compression,
query-agnostic as kvpress evaluates), scores the answers and writes rows.

With a baseline (`kvpress`), the presses kvpress also has answer every
example a second time in kvpress's own pipeline (`kvengine.eval.kvpress_client`),
from the same token ids, right after kvengine's rows of that example, so both
engines are timed under the same load; their rows carry `engine: "kvpress"`.
Seconds per example are measured the same way on both sides: wall time from
token ids to all answers decoded (prefill, compression, answers).

Every result is one JSON row appended (and flushed) as soon as it is known,
keyed by (engine, model, seed, task, length, example, depth, press, ratio,
kivi); a run started again on the same file skips the keys already there
(`kvengine.eval.resume`), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvengine.config import CacheConfig
from kvengine.engine.generate import encode_prompt
from kvengine.errors import InvalidRequestError
from kvengine.eval.budget import budget_settings, bytes_16bit, ratio_for_budget
from kvengine.eval.kvpress_client import BASELINES, RECIPE, KvpressWorker, is_shared
from kvengine.eval.measure import Measured, Setting, measure
from kvengine.eval.resume import KEY_FIELDS, Key, done_keys
from kvengine.eval.tasks import (
    Example,
    default_depth,
    expand_task_names,
    load_jsonl_tasks,
    make_example,
    score,
    uses_depth,
)
from kvengine.models import LoadedModel
from kvengine.press.demote import is_demote_spec
from kvengine.press.methods import is_selection, method_or_press
from kvengine.results import append_rows, make_row


@dataclass(frozen=True)
class EvalConfig:
    """What `run_eval` measures: every task x length x example, under every setting.

    `tasks` holds task names, "ruler" (all RULER tasks) or paths of JSONL task
    files (their examples ignore `lengths`). Press "none" runs once, at ratio 0;
    every other press runs at every ratio; each KIVI width runs without press,
    and with each demote press ("demote" or "demote:SCORER") at every ratio
    (a demote press needs KIVI widths: its demoted tokens are packed), and
    with each of `packed_presses` (presses or duo that evict, then pack what
    they keep). `budgets` (fractions of the 16-bit cache's bytes) replace
    `ratios`: each setting runs at the ratio that holds that budget on its
    storage (`kvengine.eval.budget`).
    `kv_rotate` and `kv_key_groups` shape the packed blocks of every KIVI run
    (`CacheConfig`); rows of other storage belong in another results file.
    `baseline` "kvpress" also runs the presses kvpress has through kvpress,
    with the python of a venv that has it (`kvpress_python`, needed when it runs).
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
    baseline: str | None = None
    kvpress_python: Path | None = None  # no default: a venv with kvpress is the caller's to name
    kv_rotate: bool = False
    kv_key_groups: str = "channel"
    budgets: tuple[float, ...] = ()
    packed_presses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.tasks or not self.presses or not self.lengths:
            raise InvalidRequestError("tasks, lengths and presses must each name at least one")
        expand_task_names([t for t in self.tasks if not t.endswith(".jsonl")])
        if any(n < 1 for n in self.lengths):
            raise InvalidRequestError(f"lengths must be >= 1, got {self.lengths}")
        if not self.ratios or not all(0.0 <= r < 1.0 for r in self.ratios):
            raise InvalidRequestError(f"ratios must be in [0, 1), got {self.ratios}")
        if any(b not in (2, 3, 4, 8) for b in self.kivi):
            raise InvalidRequestError(f"KIVI bit widths are 2, 3, 4 or 8, got {self.kivi}")
        if any(is_demote_spec(s) for s in self.presses) and not self.kivi:
            raise InvalidRequestError("demote keeps demoted tokens packed: give KIVI bit widths (kivi) too")
        CacheConfig(kv_bits=2, **self.storage)  # bad storage options fail here
        if self.num_examples < 1 or self.max_new_tokens < 1:
            raise InvalidRequestError("num_examples and max_new_tokens must be >= 1")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise InvalidRequestError(
                f"unknown baseline {self.baseline!r}; known baselines: {', '.join(BASELINES)}"
            )
        for spec in (*self.presses, *self.packed_presses):
            if spec != "none":
                method_or_press(spec, self.ratios[0])  # bad names fail before any prefill
        self._check_budgets()

    def _check_budgets(self) -> None:
        if self.packed_presses and not self.kivi:
            raise InvalidRequestError("packed_presses run on packed pools: give KIVI bit widths (kivi) too")
        bad = [s for s in self.packed_presses if s == "none" or is_demote_spec(s) or is_selection(s)]
        if bad:
            raise InvalidRequestError(
                f"packed_presses are presses or duo that evict before packing, not {bad[0]!r} "
                "(none and demote presses run on every KIVI width already; selection keeps the whole cache)"
            )
        if not all(0.0 < b <= 1.0 for b in self.budgets):
            raise InvalidRequestError(
                f"budgets are fractions of the 16-bit cache in (0, 1], got {self.budgets}"
            )
        if self.budgets and any(is_selection(s) for s in self.presses):
            raise InvalidRequestError("a selection method holds the whole cache: it has no byte budget")

    def settings(self, model: LoadedModel | None = None, length: int | None = None) -> list[Setting]:
        """(press, ratio, kivi) of every kvengine run an example gets, in run order.

        With `budgets` the ratios depend on the model and the context length (both needed then).
        """
        if self.budgets:
            if model is None or length is None:
                raise InvalidRequestError("settings under byte budgets need the model and the context length")
            return budget_settings(
                self.presses, self.packed_presses, self.kivi, self.budgets, model, length, self.storage
            )
        out: list[Setting] = []
        for spec in self.presses:
            if is_demote_spec(spec):
                continue
            out += [("none", 0.0, 0)] if spec == "none" else [(spec, r, 0) for r in self.ratios]
        demote = [s for s in self.presses if is_demote_spec(s)] + list(self.packed_presses)
        for bits in self.kivi:
            out += [("none", 0.0, bits), *((s, r, bits) for s in demote for r in self.ratios)]
        return out

    def budget_of(self, setting: Setting, model: LoadedModel, length: int) -> float | None:
        """The budget (of `budgets`) that `setting` was planned for; None for "none" and without budgets."""
        spec, ratio, bits = setting
        if spec == "none":
            return None
        for budget in self.budgets:
            if ratio_for_budget(spec, bits, budget, model, length, self.storage) == ratio:
                return budget
        return None

    @property
    def storage(self) -> dict[str, Any]:
        """The `CacheConfig` options of the packed pools of KIVI runs, besides the width."""
        return {"kv_rotate": self.kv_rotate, "kv_key_groups": self.kv_key_groups}

    def baseline_settings(self, model: LoadedModel | None = None, length: int | None = None) -> list[Setting]:
        """The settings the baseline engine also runs: its presses, without KIVI (none when no baseline)."""
        if self.baseline is None:
            return []
        return [s for s in self.settings(model, length) if not s[2] and is_shared(s[0])]


def _key(
    engine: str,
    model: LoadedModel,
    cfg: EvalConfig,
    task: str,
    length: int,
    index: int,
    depth: float | None,
    setting: Setting,
) -> Key:
    """The key of the row `engine` writes for one example under one setting (what `row_key` reads back)."""
    return (engine, model.name, cfg.seed, task, length, index, depth, *setting)


@dataclass(frozen=True)
class _Planned:
    task: str
    length: int
    index: int
    depth: float | None  # where the answer sits; None for a user's example and the word tasks
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
                    depth = default_depth(i, cfg.num_examples) if uses_depth(task) else None
                    planned.append(_Planned(task, length, i, depth, None))
    return planned


def _example(model: LoadedModel, cfg: EvalConfig, p: _Planned) -> Example:
    if p.jsonl is not None:
        return p.jsonl
    assert model.tokenizer is not None
    depth = 0.5 if p.depth is None else p.depth  # unused by the tasks without a depth
    return make_example(p.task, model.tokenizer, p.length, cfg.seed, p.index, depth, model.max_context_len)


def _check_lengths(model: LoadedModel, cfg: EvalConfig) -> None:
    if model.tokenizer is None:
        raise InvalidRequestError(f"model {model.name!r} has no tokenizer; eval tasks are text")
    too_long = [n for n in cfg.lengths if n + cfg.max_new_tokens > model.max_context_len]
    if too_long and any(not t.endswith(".jsonl") for t in cfg.tasks):
        raise InvalidRequestError(
            f"context length {too_long[0]} (+{cfg.max_new_tokens} new tokens) is beyond "
            f"model {model.name!r}'s context of {model.max_context_len} tokens"
        )


def run_eval(model: LoadedModel, cfg: EvalConfig, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Run every (engine, example, setting) whose key is not yet in `out`; returns the rows it appended.

    The kvpress worker is started only when some baseline row is missing (then
    `cfg.kvpress_python` must be given), and stopped before this returns (or raises).
    """
    _check_lengths(model, cfg)
    planned, done = _plan(cfg, model), done_keys(out)

    def missing(engine: str, p: _Planned, settings: list[Setting]) -> list[Setting]:
        return [
            s for s in settings if _key(engine, model, cfg, p.task, p.length, p.index, p.depth, s) not in done
        ]

    todo = [
        (
            p,
            missing("kvengine", p, cfg.settings(model, p.length)),
            missing("kvpress", p, cfg.baseline_settings(model, p.length)),
        )
        for p in planned
    ]
    total = sum(
        len(cfg.settings(model, p.length)) + len(cfg.baseline_settings(model, p.length)) for p in planned
    )
    left = sum(len(a) + len(b) for _, a, b in todo)
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        worker = None
        if any(b for _, _, b in todo):
            threads = torch.get_num_threads()  # the worker computes with as many threads as kvengine
            if cfg.kvpress_python is None:
                raise InvalidRequestError(
                    f"baseline {cfg.baseline!r} needs kvpress_python, a venv's python; {RECIPE}"
                )
            worker = stack.enter_context(KvpressWorker(cfg.kvpress_python, model, threads))
        bar = stack.enter_context(
            tqdm(total=total, initial=total - left, unit="run", desc="eval", disable=not progress)
        )
        for p, pending, baseline in todo:
            if not pending and not baseline:
                continue
            bar.set_postfix_str(f"{p.task} @{p.length} #{p.index}")
            example = _example(model, cfg, p)
            for row in evaluate_example(model, example, p.index, pending, cfg, worker, baseline):
                append_rows(out, [row])
                rows.append(row)
                bar.update(1)
    return rows


def _encode(
    model: LoadedModel, example: Example, index: int, cfg: EvalConfig
) -> tuple[list[int], list[list[int]]]:
    """The context's ids and each question's (with the chat template's closing); too long fails."""
    parts = [encode_prompt(model, example.context, cfg.chat, None, q.text) for q in example.questions]
    ids, rests = parts[0][0], [rest for _, rest in parts]
    longest = len(ids) + max(len(r) for r in rests) + cfg.max_new_tokens
    if longest > model.max_context_len:
        raise InvalidRequestError(
            f"{example.task} example {index}: {longest} tokens with question and answer, beyond "
            f"model {model.name!r}'s context of {model.max_context_len}"
        )
    return ids, rests


def evaluate_example(
    model: LoadedModel,
    example: Example,
    index: int,
    settings: list[Setting],
    cfg: EvalConfig,
    worker: KvpressWorker | None = None,
    baseline: list[Setting] | None = None,
) -> Iterator[dict[str, Any]]:
    """One row per setting of one example, yielded as each is measured: kvengine's, then the baseline's.

    Row values: `value` is the mean score over the questions; `kv_bytes` what
    the cache holds for the (compressed) context, `kv_bytes_full` the
    uncompressed fp cache; times in seconds (`answer_s` for all questions).
    The baseline settings (never KIVI) run in `worker`, on the same ids.
    """
    ids, rests = _encode(model, example, index, cfg)
    row = _RowMaker(model, example, index, cfg, len(ids))
    for m in measure(model, ids, rests, settings, cfg.max_new_tokens, cfg.storage):
        yield row("kvengine", m)
    if baseline:
        assert worker is not None, "baseline settings need a kvpress worker"
        for r in worker.run(ids, rests, cfg.max_new_tokens, [(s[0], s[1]) for s in baseline]):
            if "error" in r:  # no row: the setting stays missing, and the comparison leaves it out
                warnings.warn(
                    f"kvpress could not run {r['press']} at {r['ratio']}: {r['error']}", stacklevel=2
                )
                continue
            m = Measured(
                r["press"], float(r["ratio"]), 0, r["outputs"], r["kv_bytes"], r["kv_bytes_full"],
                r["prefill_s"], 0.0, r["answer_s"],
            )  # fmt: skip
            yield row("kvpress", m, worker.versions)


@dataclass
class _RowMaker:
    """Builds the result rows of one example (what stays the same across its settings and engines)."""

    model: LoadedModel
    example: Example
    index: int
    cfg: EvalConfig
    num_context_tokens: int  # the context's ids, chat template included

    def __call__(
        self, engine: str, m: Measured, extra_versions: dict[str, str] | None = None
    ) -> dict[str, Any]:
        ex = self.example
        scores = [score(q.answers, out) for q, out in zip(ex.questions, m.outputs, strict=True)]
        key = _key(
            engine, self.model, self.cfg, ex.task, ex.length, self.index, ex.depth, (m.press, m.ratio, m.kivi)
        )
        config = dict(zip(KEY_FIELDS, key, strict=True))
        row = make_row("eval", "score", sum(scores) / len(scores), "fraction", **config)
        full_16bit = bytes_16bit(
            self.model, self.num_context_tokens
        )  # the budgets' unit, whatever the pool's dtype
        row["versions"].update(extra_versions or {})
        row.update(
            num_tokens=ex.num_tokens,
            num_questions=len(scores),
            scores=scores,
            outputs=m.outputs,
            kv_bytes=m.kv_bytes,
            kv_bytes_full=m.kv_bytes_full,
            kv_bytes_16bit=full_16bit,
            kv_fraction_16bit=m.kv_bytes / full_16bit,
            prefill_s=m.prefill_s,
            compress_s=m.compress_s,
            answer_s=m.answer_s,
        )
        if m.kivi:
            row["storage"] = self.cfg.storage
        if m.blocks_read is not None:
            row["blocks_read_fraction"] = m.blocks_read
        budget = self.cfg.budget_of((m.press, m.ratio, m.kivi), self.model, ex.length)
        if budget is not None:
            row["kv_budget_16bit"] = budget
        return row
