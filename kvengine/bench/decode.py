"""`kvengine bench decode`: prefill and decode speed, kvengine vs transformers' generate (and llama.cpp).

All systems run the same prompt (a needle-task document, cut to the exact
length), one request at a time, greedy, with the same number of new tokens;
runs alternate between the systems so that drift of this noisy machine hits
all alike. transformers runs on the same model object with its own dynamic
cache and SDPA attention. With `--baseline llamacpp`, llama.cpp (in its own
venv, `kvengine.bench.llamacpp`) runs the same GGUF weights at the same
precision, and each baseline's tokens are compared with kvengine's. Time
stamps come from the step loop itself (a logits processor for transformers,
`Engine.step` for kvengine, the worker's decode loop for llama.cpp): prefill
time is from the call to the first token, decode speed is tokens after the
first over the time after the first.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from kvengine.bench.llamacpp import LlamaCppBaseline, LlamaCppWorker
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.eval.needle import make_needle_example
from kvengine.models import LoadedModel, load
from kvengine.models.own_attention import use_attention
from kvengine.results import append_report, append_rows, make_row, markdown_table

Run = tuple[float, float, list[int]]  # prefill seconds, decode tokens/s, the generated tokens
Timer = Callable[[LoadedModel, list[int], int], Run]


class _StepClock(LogitsProcessor):
    """Records the time of each decoding step of transformers' generate."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


def time_transformers(model: LoadedModel, prompt: list[int], new_tokens: int) -> Run:
    """(prefill seconds, decode tokens/s, tokens) of transformers' generate."""
    hf = model.hf_model
    clock = _StepClock()
    with use_attention(hf, "sdpa"), torch.inference_mode():
        start = time.perf_counter()
        out = hf.generate(  # type: ignore[operator]
            torch.tensor([prompt], device=hf.device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=hf.device),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=0,
        )
    decode_tps = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
    return clock.times[0] - start, decode_tps, out[0, len(prompt) :].tolist()


def time_kvengine(model: LoadedModel, prompt: list[int], new_tokens: int) -> Run:
    """(prefill seconds, decode tokens/s, tokens) of kvengine's engine, one request."""
    engine = Engine(
        model,
        CacheConfig(max_kv_bytes=2 * 2**30),
        SchedulerConfig(max_num_seqs=1, max_step_tokens=len(prompt)),
    )
    seq_id = engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    start = time.perf_counter()
    engine.step()
    first = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    decode_tps = steps / (time.perf_counter() - first)
    return first - start, decode_tps, list(engine.sequences[seq_id].output_ids)


def llamacpp_timer(worker: LlamaCppWorker) -> Timer:
    """A timer like `time_kvengine` that runs the request in the llama.cpp worker (on the same ids)."""

    def run(model: LoadedModel, prompt: list[int], new_tokens: int) -> Run:
        reply = worker.decode(prompt, new_tokens)
        return reply["prefill_s"], reply["decode_tokens_per_s"], list(reply["output_ids"])

    return run


def measure(
    model: LoadedModel,
    systems: dict[str, Timer],
    prompts: dict[int, list[int]],
    new_tokens: int,
    repeats: int,
) -> dict[tuple[str, int], list[Run]]:
    """Every system's runs per prompt length, the systems alternating within each repeat."""
    results: dict[tuple[str, int], list[Run]] = {}
    runs = [(n, r, s) for n in prompts for r in range(repeats) for s in systems]
    for n, _, system in tqdm(runs, desc="bench decode", unit="run"):
        results.setdefault((system, n), []).append(systems[system](model, prompts[n], new_tokens))
    return results


def medians(runs: list[Run]) -> tuple[float, float]:
    """Median prefill seconds and median decode tokens/s of `runs`."""
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def tokens_match(runs: list[Run], reference: list[int]) -> bool:
    """Whether every run generated exactly `reference`'s tokens."""
    return all(r[2] == reference for r in runs)


def make_rows(
    results: dict[tuple[str, int], list[Run]],
    model: LoadedModel,
    config: dict[str, Any],
    extra: dict[str, Any],
) -> list[dict]:
    """Two rows (prefill and decode tokens/s, medians) per system and length; baselines say `tokens_match`.

    `extra` maps a system to config fields only its rows carry (llama.cpp's version, precision).
    """
    rows = []
    for (system, n), runs in results.items():
        prefill_s, decode_tps = medians(runs)
        dtype = str(model.dtype).removeprefix("torch.")
        cfg: dict[str, Any] = dict(
            system=system, model=model.name, dtype=dtype, weights=model.weights, prompt_len=n
        )
        cfg.update(config, **extra.get(system, {}))
        if system != "kvengine":
            cfg["tokens_match"] = tokens_match(runs, results["kvengine", n][0][2])
        rows.append(make_row("decode", "prefill_tokens_per_s", n / prefill_s, "tok/s", **cfg))
        rows.append(make_row("decode", "decode_tokens_per_s", decode_tps, "tok/s", **cfg))
    return rows


def table(results: dict[tuple[str, int], list[Run]], lengths: list[int], llamacpp: bool) -> str:
    """The Markdown table: tok/s per system and length, ratios (> 1: kvengine faster), llama.cpp's match."""
    header = [
        "prompt tokens",
        "prefill tok/s kvengine", "prefill tok/s transformers", "prefill ratio",
        "decode tok/s kvengine", "decode tok/s transformers", "decode ratio",
    ]  # fmt: skip
    if llamacpp:
        header += [
            "prefill tok/s llama.cpp", "prefill ratio vs llama.cpp",
            "decode tok/s llama.cpp", "decode ratio vs llama.cpp", "llama.cpp tokens = kvengine's",
        ]  # fmt: skip
    body = []
    for n in lengths:
        kv, hf = medians(results["kvengine", n]), medians(results["transformers", n])
        line: list[Any] = [n, f"{n / kv[0]:.0f}", f"{n / hf[0]:.0f}", f"{hf[0] / kv[0]:.2f}"]
        line += [f"{kv[1]:.1f}", f"{hf[1]:.1f}", f"{kv[1] / hf[1]:.2f}"]
        if llamacpp:
            lc = medians(results["llamacpp", n])
            line += [f"{n / lc[0]:.0f}", f"{lc[0] / kv[0]:.2f}", f"{lc[1]:.1f}", f"{kv[1] / lc[1]:.2f}"]
            line.append(tokens_match(results["llamacpp", n], results["kvengine", n][0][2]))
        body.append(line)
    return markdown_table(header, body)


def run_decode_bench(
    model_name: str,
    lengths: list[int],
    new_tokens: int,
    repeats: int,
    out: Path,
    report: Path,
    *,
    command: str = "kvengine bench decode",
    llamacpp: LlamaCppBaseline | None = None,
    device: str = "auto",
) -> list[dict]:
    """Measure, append JSON rows to `out` and a table to `report` (headed by `command`); returns the rows.

    With `llamacpp`, the model is loaded in the dtype of llama.cpp's precision and llama.cpp runs too.
    The model runs on `device` (`models.device`).
    """
    systems: dict[str, Timer] = {"transformers": time_transformers, "kvengine": time_kvengine}
    extra: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        if llamacpp:  # started first: a missing or broken venv stops the bench before the model loads
            worker = stack.enter_context(LlamaCppWorker(llamacpp, model_name))
            systems["llamacpp"] = llamacpp_timer(worker)
            extra["llamacpp"] = baseline_config(worker)
        model = load(
            model_name,
            dtype=llamacpp.dtype if llamacpp else "auto",
            device=device,
            weights=llamacpp.weights if llamacpp else "model",
        )
        doc = make_needle_example(model, max(lengths) + 64, depth=0.5, seed=0).context
        doc_ids = model.tokenizer.encode(doc) if model.tokenizer else []
        prompts = {n: doc_ids[:n] for n in lengths}
        results = measure(model, systems, prompts, new_tokens, repeats)
    rows = make_rows(results, model, dict(new_tokens=new_tokens, repeats=repeats), extra)
    append_rows(out, rows)
    body = table(results, lengths, llamacpp is not None)
    print(body)
    dtype = str(model.dtype).removeprefix("torch.") + (
        "" if model.weights == "model" else f" (weights {model.weights})"
    )
    notes = (
        f"Model {model.name}, {dtype} on {model.device}, batch 1, greedy, {new_tokens} new tokens, median of {repeats} "
        "alternating runs; ratio > 1 means kvengine is faster."
    )
    if llamacpp:
        notes += " " + baseline_note(extra["llamacpp"])
    title = "Prefill and decode speed vs transformers' generate" + (" and llama.cpp" if llamacpp else "")
    append_report(report, title, command, body, notes)
    return rows


def baseline_config(worker: LlamaCppWorker) -> dict[str, Any]:
    """The config fields of llama.cpp's rows: precision, threads, library version."""
    return {
        "precision": worker.baseline.precision,
        "threads": worker.baseline.num_threads,
        "llama_cpp_python": worker.versions.get("llama-cpp-python", "?"),
    }


def baseline_note(config: dict[str, Any]) -> str:
    """The report's sentence on how llama.cpp ran."""
    return (
        f"llama.cpp: llama-cpp-python {config['llama_cpp_python']} built from source, the same GGUF "
        f"re-exported at {config['precision']} by llama.cpp's own quantize, KV cache at {config['precision']}, "
        f"flash attention off, {config['threads']} threads; its tokens are compared with kvengine's."
    )
