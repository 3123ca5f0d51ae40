"""`kvengine bench rag`: time to first token and accuracy of chunk reuse on a RAG workload, side by side.

The workload (kvengine/rag/workload.py): documents of real prose with a
planted access code each, questions over 4-6 of them in random order. Systems,
run one after another on every question (their order rotating per question,
so a slow spell of the shared machine hits all of them alike):

- "full": the whole prompt prefilled, no cache (the reference);
- "prefix": the prefix cache only, warmed with every document at the start
  of a prompt (template + document), as if each had been asked about alone;
- "reuse": chunks from the chunk store, re-rotated, nothing recomputed;
- "blend-R": CacheBlend with R% of each moved chunk's tokens recomputed;
- "reuse" and "blend-R" with "+sinkN" (each moved chunk's first N tokens
  always recomputed) and / or "+head" (chunks computed after the prompt's
  head instead of at position 0), e.g. "blend-15+head+sink8" (`--systems`).

The chunk store is filled before the timed questions (chunks are computed
once, ahead of use, as CacheBlend assumes); the time to fill it is reported.
TTFT is from the call to the first token (chunk reads, assembly, recompute
and the suffix's prefill included). Rows are JSON lines; a Markdown table
goes to the report.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvengine.errors import InvalidRequestError
from kvengine.results import append_report, append_rows, make_row, markdown_table

if TYPE_CHECKING:
    from kvengine.engine.engine import Engine
    from kvengine.models import LoadedModel
    from kvengine.rag.blend import BlendConfig


_HELP = """Time to first token and accuracy of RAG prompts (questions over 4-6 of a pool of documents
of real prose with a planted access code each, in random order) for full recompute, the prefix cache
only, chunk reuse without recompute and CacheBlend at each --ratios, systems alternating per question.
Rows are appended as JSON lines to --out, and a table to --report."""


SYSTEM_FORMS = "full, prefix, reuse[+OPTS], blend-R[+OPTS] (R: percent recomputed; OPTS: sinkN, head)"


def parse_system(spec: str) -> tuple[str, BlendConfig]:
    """A system label -> (engine it runs on, its blend config); InvalidRequestError naming the forms.

    "full" and "prefix" reuse no chunk; "reuse" and "blend-R" (R percent) may
    take "+sinkN" (N first tokens of each moved chunk always recomputed) and
    "+head" (chunks computed after the prompt's head), e.g. "blend-15+head+sink8".
    """
    from kvengine.rag.blend import BlendConfig

    base, *opts = spec.strip().split("+")
    if base in ("full", "prefix") and not opts:
        return ("plain" if base == "full" else "prefix"), BlendConfig("full")
    options: dict[str, Any] = {}
    for opt in opts:
        if opt == "head" and "anchor" not in options:
            options["anchor"] = "head"
        elif opt.startswith("sink") and opt[4:].isdigit() and "sink_tokens" not in options:
            options["sink_tokens"] = int(opt[4:])
        else:
            raise InvalidRequestError(f"bad option {opt!r} in system {spec!r}; known forms: {SYSTEM_FORMS}")
    if base == "reuse":
        return "chunks", BlendConfig("reuse", **options)
    percent = base.removeprefix("blend-")
    if base.startswith("blend-") and percent.isdigit() and int(percent) <= 100:
        return "chunks", BlendConfig("blend", int(percent) / 100, **options)
    raise InvalidRequestError(f"unknown system {spec!r}; known forms: {SYSTEM_FORMS}")


def systems(ratios: list[float], names: list[str] | None = None) -> dict[str, tuple[str, BlendConfig]]:
    """System label -> (engine it runs on, its blend config): `names`, or full, prefix, reuse, blend-R per ratio."""
    if names is None:
        names = ["full", "prefix", "reuse"] + [f"blend-{round(r * 100)}" for r in ratios]
    return {name: parse_system(name) for name in names}


def engines_used(table: dict[str, tuple[str, BlendConfig]]) -> set[str]:
    return {engine_name for engine_name, _ in table.values()}


def run_rag_bench(
    model: LoadedModel, args: argparse.Namespace, out: Path, report: Path, command: str
) -> list[dict[str, Any]]:
    """Run every system on every question; append rows to `out` and a table to `report`; return the rows."""
    from kvengine.engine.request import SamplingParams
    from kvengine.rag import build_rag_prompt, rag_generate
    from kvengine.rag.api import stored_sequences
    from kvengine.rag.chunks import ChunkStore
    from kvengine.rag.workload import SYSTEM, build_documents, build_questions

    tok = model.tokenizer
    if tok is None:
        raise InvalidRequestError(f"bench rag needs a model with a tokenizer; {model.name} has none")
    docs = build_documents(tok, args.documents, args.min_doc_tokens, args.max_doc_tokens, args.seed)
    questions = build_questions(docs, args.questions, args.min_docs, args.max_docs, args.seed)
    prompts = [
        build_rag_prompt(tok, [docs[i].text for i in q.documents], q.question, system=SYSTEM)
        for q in questions
    ]
    table = systems(args.ratios, getattr(args, "systems", None))
    engines = _engines(model, args.max_kv_mib)
    start = time.perf_counter()
    blends = {blend for engine_name, blend in table.values() if engine_name == "chunks"}
    ChunkStore(engines["chunks"]).ensure(
        [seq for p in prompts for b in blends for seq in stored_sequences(p, b)], ""
    )
    fill_s = time.perf_counter() - start
    head = prompts[0].token_ids[: prompts[0].spans[0][0]]
    # The prefix baseline's cache: each document once at the start of a prompt, as if asked about alone
    # before (only those that open some prompt can be hit, so only those are computed).
    openers = {q.documents[0] for q in questions} if "prefix" in engines_used(table) else set()
    for first in sorted(openers):
        ids = head + list(tok.encode(docs[first].text, add_special_tokens=False))
        engines["prefix"].generate([ids], SamplingParams(max_tokens=1))
    results: dict[str, list[tuple[float, float, bool, int]]] = {name: [] for name in table}
    params = SamplingParams(max_tokens=args.new_tokens)
    for qi, (q, prompt) in enumerate(zip(questions, prompts, strict=True)):
        names = list(table)
        for name in names[qi % len(names) :] + names[: qi % len(names)]:
            engine_name, blend = table[name]
            res = rag_generate(engines[engine_name], prompt, params, blend=blend)
            text = str(tok.decode(res.output.output_ids, skip_special_tokens=True))
            results[name].append((res.ttft_s, res.ttft_cpu_s, q.is_correct(text), res.num_recomputed_tokens))
        append_rows(out, _question_rows(qi, results))  # as it goes: a run cut short keeps what it measured
    rows = _rows(results, args, len(prompts[0].token_ids), fill_s, [len(p.token_ids) for p in prompts])
    append_rows(out, rows)
    append_report(report, "RAG chunk reuse (CacheBlend)", command, _markdown(rows), _notes(fill_s, prompts))
    return rows


def _question_rows(qi: int, results: dict[str, list[tuple[float, float, bool, int]]]) -> list[dict[str, Any]]:
    """One row per system for question `qi` (its last results): TTFT, CPU TTFT, right or not, recomputed tokens."""
    rows = []
    for name, runs in results.items():
        ttft, cpu, ok, recomputed = runs[-1]
        rows.append(
            make_row("rag", "question_ttft", ttft, "s", system=name, question=qi, ttft_cpu_s=cpu, correct=ok,
                     recomputed_tokens=recomputed)
        )  # fmt: skip
    return rows


def _engines(model: LoadedModel, max_kv_mib: int) -> dict[str, Engine]:
    from kvengine.config import CacheConfig
    from kvengine.engine.engine import Engine

    big = max_kv_mib * 2**20
    return {
        "plain": Engine(model, CacheConfig(max_kv_bytes=big // 4)),
        "prefix": Engine(model, CacheConfig(prefix_cache=True, max_kv_bytes=big)),
        "chunks": Engine(model, CacheConfig(prefix_cache=True, max_kv_bytes=big)),
    }


def _rows(
    results: dict[str, list[tuple[float, float, bool, int]]],
    args: argparse.Namespace,
    _: int,
    fill_s: float,
    lens: list[int],
) -> list[dict[str, Any]]:
    full_ttft = statistics.median(t for t, _, _, _ in results["full"])
    full_cpu = statistics.median(c for _, c, _, _ in results["full"])
    config = dict(
        documents=args.documents, questions=args.questions, doc_tokens=[args.min_doc_tokens, args.max_doc_tokens],
        docs_per_prompt=[args.min_docs, args.max_docs], prompt_tokens_median=statistics.median(lens),
        new_tokens=args.new_tokens, threads=getattr(args, "threads", None),
        store_fill_s=round(fill_s, 2), seed=args.seed,
    )  # fmt: skip
    rows = []
    for name, runs in results.items():
        ttft = statistics.median(t for t, _, _, _ in runs)
        cpu = statistics.median(c for _, c, _, _ in runs)
        acc = sum(ok for _, _, ok, _ in runs) / len(runs)
        recomputed = statistics.mean(n for _, _, _, n in runs)
        for metric, value, unit in (
            ("ttft_median", ttft, "s"),
            ("speedup_vs_full", full_ttft / ttft, "x"),
            ("ttft_cpu_median", cpu, "s"),
            ("cpu_speedup_vs_full", full_cpu / cpu, "x"),
            ("accuracy", acc, "fraction"),
            ("recomputed_tokens_mean", recomputed, "tokens"),
        ):
            rows.append(make_row("rag", metric, value, unit, system=name, **config))
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    by: dict[str, dict[str, float]] = {}
    for row in rows:
        by.setdefault(row["config"]["system"], {})[row["metric"]] = row["value"]
    n = rows[0]["config"]["questions"]
    body = [
        (
            name,
            f"{m['accuracy']:.3f}",
            f"{m['ttft_median']:.2f}",
            f"{m['speedup_vs_full']:.2f}",
            f"{m['ttft_cpu_median']:.2f}",
            f"{m['cpu_speedup_vs_full']:.2f}",
            f"{m['recomputed_tokens_mean']:.0f}",
        )
        for name, m in by.items()
    ]
    header = (
        "system",
        f"accuracy ({n} questions)",
        "TTFT median (s)",
        "TTFT speed-up vs full",
        "TTFT CPU median (s)",
        "CPU speed-up vs full",
        "tokens recomputed in assembly",
    )
    return markdown_table(header, body)


def _notes(fill_s: float, prompts: list[Any]) -> str:
    lens = sorted(len(p.token_ids) for p in prompts)
    return (
        f"Prompts of {lens[0]}-{lens[-1]} tokens. Filling the chunk store (every document once, alone at "
        f"position 0 and / or after the prompt's head for +head systems) took {fill_s:.1f} s before the timed "
        "questions. Systems alternate per question on a "
        "machine shared with other jobs; TTFT is the median over questions, in wall time and in this "
        "process's CPU time (one torch thread: CPU time does not grow when other jobs take the cores)."
    )


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _ratios(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"recompute ratios must be in [0, 1], got {text!r}")
    return values


def _system_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    try:
        if not names or "full" not in names:
            raise InvalidRequestError(f"--systems must include full (the reference), got {text!r}")
        for name in names:
            parse_system(name)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return list(dict.fromkeys(names))


def add_rag_parser(bench_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`bench rag`'s parser with its options (the caller adds --out / --report)."""
    from kvengine.config import DEFAULT_MODEL
    from kvengine.models.precision import DTYPE_CHOICES

    positive_int, ratio_list = _positive_int, _ratios
    p: argparse.ArgumentParser = bench_sub.add_parser(
        "rag", help="RAG chunk reuse (CacheBlend): TTFT and accuracy per mode", description=_HELP
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="weights and KV precision (auto: as elsewhere)"
    )
    p.add_argument("--documents", type=positive_int, default=50, help="documents in the pool")
    p.add_argument("--min-doc-tokens", type=positive_int, default=300)
    p.add_argument("--max-doc-tokens", type=positive_int, default=800)
    p.add_argument("--questions", type=positive_int, default=20, help="questions (prompts) to time")
    p.add_argument("--min-docs", type=positive_int, default=4, help="fewest documents per prompt")
    p.add_argument("--max-docs", type=positive_int, default=6, help="most documents per prompt")
    p.add_argument("--ratios", type=ratio_list, default=[0.05, 0.15, 0.30], help="blend recompute ratios")
    p.add_argument(
        "--systems",
        type=_system_list,
        default=None,
        help=f"comma-separated systems to run instead of those --ratios makes; forms: {SYSTEM_FORMS}",
    )
    p.add_argument("--new-tokens", type=positive_int, default=24, help="output tokens per question")
    p.add_argument("--max-kv-mib", type=positive_int, default=2048, help="KV pool of each caching engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (1: steady on a machine shared with others)",
    )
    return p


def cmd_bench_rag(args: argparse.Namespace) -> None:
    import torch

    from kvengine.models import load

    torch.set_num_threads(args.threads)
    model = load(args.model, dtype=args.dtype)
    rows = run_rag_bench(model, args, Path(args.out), Path(args.report), args.command_line)
    print(_markdown(rows))
