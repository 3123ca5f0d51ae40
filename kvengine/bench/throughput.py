"""`kvengine bench throughput` and `kvengine bench prefix`: the engine as a server sees it.

Throughput: output tokens/s of the engine with 1, 4, 16, 32 requests in
flight at once (all added together, greedy, `ignore_eos`), against
transformers' `generate` (its own dynamic cache, SDPA attention) serving the
same kind of requests one at a time, and against one batched `generate` call
over the same prompts at each concurrency (left-padded; equal lengths here),
measured in the same run, interleaved with the engine's runs. The engine's
tokens for the baseline's prompts are compared with transformers' tokens and
the agreement is reported next to the speed.

Prefix: time to first token of a request whose long prefix (2,048 tokens by
default) is in the prefix cache, against the same kind of request on a cold
cache (the baseline). Each repeat uses a fresh engine: a cold request with
suffix i, then a warm one with suffix i + 1; the warm output is checked
against the next repeat's cold output for the same prompt.

Prompts are windows of the needle task's haystack (random token ids for a
model without a tokenizer), so no two share a prefix unless asked to.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kvengine.bench.decode import baseline_config, baseline_note
from kvengine.bench.llamacpp import LlamaCppBaseline, LlamaCppWorker
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.eval.needle import make_needle_example
from kvengine.models import LoadedModel, load
from kvengine.models.own_attention import use_attention
from kvengine.results import append_report, append_rows, make_row, markdown_table

POOL_BYTES = 2 * 2**30


def document_ids(model: LoadedModel, num_tokens: int, seed: int = 0) -> list[int]:
    """At least `num_tokens` token ids of running text (random ids without a tokenizer)."""
    if model.tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, model.config.vocab_size, (num_tokens,), generator=g).tolist()
    ids: list[int] = []
    while len(ids) < num_tokens:
        text = make_needle_example(model, min(num_tokens, 8192) + 64, depth=0.5, seed=seed).context
        ids += model.tokenizer.encode(text, add_special_tokens=False)
        seed += 1
    return ids


def hf_generate(model: LoadedModel, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """transformers' greedy tokens (exactly `new_tokens`) and the seconds they took."""
    [tokens], seconds = hf_batch_generate(model, [prompt], new_tokens)
    return tokens, seconds


def hf_batch_generate(
    model: LoadedModel, prompts: list[list[int]], new_tokens: int
) -> tuple[list[list[int]], float]:
    """transformers' greedy tokens for all prompts in one padded batched `generate` call, and its seconds.

    Prompts are left-padded to the longest (the bench's are all one length, so
    no compute goes to padding: the strongest case for this baseline).
    """
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    hf = model.hf_model
    with use_attention(hf, "sdpa"), torch.inference_mode():
        start = time.perf_counter()
        out = hf.generate(  # type: ignore[operator]
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        elapsed = time.perf_counter() - start
    return out[:, longest:].tolist(), elapsed


def engine_batch(
    model: LoadedModel, prompts: list[list[int]], new_tokens: int, cache: CacheConfig | None = None
) -> tuple[list[list[int]], float]:
    """The engine's greedy tokens for all prompts in flight at once, and the seconds they took."""
    longest = max(len(p) for p in prompts)
    engine = Engine(
        model,
        cache or CacheConfig(max_kv_bytes=POOL_BYTES),
        SchedulerConfig(max_num_seqs=len(prompts), max_step_tokens=max(2048, longest)),
    )
    start = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    return [o.output_ids for o in outputs], time.perf_counter() - start


def measure_throughput(
    model: LoadedModel,
    concurrency: list[int],
    prompt_len: int,
    new_tokens: int,
    baseline_requests: int,
    llamacpp: LlamaCppWorker | None = None,
) -> dict[str, Any]:
    """Output tokens/s of transformers one at a time and of the engine at each concurrency.

    With `llamacpp`, llama.cpp serves the same prompts as parallel sequences right after the
    engine at each concurrency: `llamacpp[c]` tokens/s, `llamacpp_match[c]` its tokens == the engine's.
    """
    doc = document_ids(model, (max(concurrency) + 1) * prompt_len)
    prompts = [doc[i * prompt_len : (i + 1) * prompt_len] for i in range(max(concurrency) + 1)]
    warm = prompts[-1][:16]  # first calls pay one-off costs: not part of any measurement
    hf_generate(model, warm, 2)
    engine_batch(model, [warm], 2)
    # Baseline requests are spread between the engine's runs, so that drift of a
    # shared machine hits both systems alike.
    hf_tokens: list[list[int]] = []
    hf_seconds = 0.0
    result: dict[str, Any] = {"kvengine": {}, "outputs": {}}
    for i in range(max(baseline_requests, len(concurrency))):
        if i < baseline_requests:
            tokens, seconds = hf_generate(model, prompts[i], new_tokens)
            hf_tokens.append(tokens)
            hf_seconds += seconds
        if i < len(concurrency):
            c = concurrency[i]
            outputs, seconds = engine_batch(model, prompts[:c], new_tokens)
            result["kvengine"][c] = c * new_tokens / seconds
            result["outputs"][c] = outputs
            batched, seconds = hf_batch_generate(model, prompts[:c], new_tokens)
            result.setdefault("batched", {})[c] = c * new_tokens / seconds
            result.setdefault("batched_match", {})[c] = batched == outputs
            if llamacpp is not None:
                reply = llamacpp.throughput(prompts[:c], new_tokens)
                result.setdefault("llamacpp", {})[c] = c * new_tokens / reply["seconds"]
                result.setdefault("llamacpp_match", {})[c] = reply["output_ids"] == outputs
    result["transformers"] = baseline_requests * new_tokens / hf_seconds
    checked = [c for c in concurrency if c >= baseline_requests]
    if checked:  # the engine's tokens for the baseline's prompts, in the first large enough batch
        result["tokens_match"] = result["outputs"][checked[0]][:baseline_requests] == hf_tokens
    del result["outputs"]
    return result


def throughput_rows(res: dict[str, Any], cfg: dict[str, Any], llamacpp_cfg: dict[str, Any]) -> list[dict]:
    """One row per system and concurrency (transformers: one, at concurrency 1)."""

    def row(tps: float, **fields: Any) -> dict:
        return make_row("throughput", "output_tokens_per_s", tps, "tok/s", **fields, **cfg)

    rows = [row(res["transformers"], system="transformers", concurrency=1)]
    rows += [row(tps, system="kvengine", concurrency=c) for c, tps in res["kvengine"].items()]
    rows += [
        row(tps, system="transformers", concurrency=c, mode="batched", tokens_match=res["batched_match"][c])
        for c, tps in res["batched"].items()
    ]
    for c, tps in res.get("llamacpp", {}).items():
        match = res["llamacpp_match"][c]
        rows.append(
            row(tps, system="llamacpp", concurrency=c, mode="batched", tokens_match=match, **llamacpp_cfg)
        )
    return rows


def throughput_table(res: dict[str, Any]) -> str:
    """Markdown: kvengine tok/s per concurrency against each baseline (ratio > 1: kvengine faster)."""
    hf, lc, batched = res["transformers"], res.get("llamacpp"), res["batched"]
    header = ["requests in flight", "kvengine tok/s", "transformers tok/s (one at a time)", "ratio"]
    header += ["transformers tok/s (batched generate)", "ratio vs batched", "batched tokens = kvengine's"]
    if lc:
        header += [
            "llama.cpp tok/s (parallel sequences)",
            "ratio vs llama.cpp",
            "llama.cpp tokens = kvengine's",
        ]
    table = []
    for c, tps in res["kvengine"].items():
        line: list[Any] = [c, f"{tps:.1f}", f"{hf:.1f}", f"{tps / hf:.2f}"]
        line += [f"{batched[c]:.1f}", f"{tps / batched[c]:.2f}", res["batched_match"][c]]
        if lc:
            line += [f"{lc[c]:.1f}", f"{tps / lc[c]:.2f}", res["llamacpp_match"][c]]
        table.append(line)
    return markdown_table(header, table)


def run_throughput_bench(
    model_name: str,
    concurrency: list[int],
    prompt_len: int,
    new_tokens: int,
    baseline_requests: int,
    out: Path,
    report: Path,
    *,
    command: str = "kvengine bench throughput",
    llamacpp: LlamaCppBaseline | None = None,
) -> list[dict]:
    """Measure, append JSON rows to `out` and a table to `report` (headed by `command`); returns the rows.

    With `llamacpp`, the model is loaded in the dtype of llama.cpp's precision and llama.cpp runs too.
    """
    llamacpp_cfg: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        # Started first: a missing or broken llama.cpp venv stops the bench before the model loads.
        worker = stack.enter_context(LlamaCppWorker(llamacpp, model_name)) if llamacpp else None
        model = (
            load(model_name, dtype=llamacpp.dtype, weights=llamacpp.weights) if llamacpp else load(model_name)
        )
        res = measure_throughput(model, concurrency, prompt_len, new_tokens, baseline_requests, worker)
        if worker is not None:
            llamacpp_cfg = baseline_config(worker)
    dtype = str(model.dtype).removeprefix("torch.")
    rows = throughput_rows(
        res, dict(model=model.name, dtype=dtype, prompt_len=prompt_len, new_tokens=new_tokens), llamacpp_cfg
    )
    append_rows(out, rows)
    body = throughput_table(res)
    print(body)
    notes = (
        f"Model {model.name}, {dtype}, {prompt_len}-token prompts, {new_tokens} output tokens each, greedy, "
        f"ignore_eos; transformers served {baseline_requests} requests one after another (SDPA, dynamic cache). "
        f"kvengine's tokens for those prompts equal transformers': {res.get('tokens_match')}."
    )
    if worker is not None:
        notes += (
            " llama.cpp ran right after kvengine at each concurrency, the same prompts as parallel sequences "
            "of one context (batched prefill, then one batched decode step per token). "
            + baseline_note(llamacpp_cfg)
        )
    title = "Throughput: concurrent requests vs transformers' generate one at a time"
    append_report(report, title + (" and llama.cpp" if worker else ""), command, body, notes)
    return rows


def time_to_first_token(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, int, list[int]]:
    """(seconds to the first token, prompt tokens reused from the cache, all output tokens)."""
    start = time.perf_counter()
    seq_id = engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    first = None
    while not engine.sequences[seq_id].is_finished:
        events = engine.step()
        if first is None and any(e.seq_id == seq_id for e in events):
            first = time.perf_counter() - start
    assert first is not None
    seq = engine.release(seq_id)
    return first, seq.num_cached_tokens, seq.output_ids


def measure_prefix_ttft(
    model: LoadedModel, prefix_len: int, suffix_len: int, new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Time to first token with a cached `prefix_len`-token prefix and on a cold cache."""
    doc = document_ids(model, prefix_len + (repeats + 1) * suffix_len)
    prefix = doc[:prefix_len]
    suffixes = [
        doc[prefix_len + i * suffix_len : prefix_len + (i + 1) * suffix_len] for i in range(repeats + 1)
    ]
    cache = CacheConfig(max_kv_bytes=POOL_BYTES, prefix_cache=True)
    step_tokens = SchedulerConfig(
        max_step_tokens=prefix_len + suffix_len
    )  # one prefill step, as a server would
    engine_batch(model, [prefix[:16]], 2)  # one-off costs of the first call
    cold: list[float] = []
    warm: list[float] = []
    cached: list[int] = []
    agree: list[bool] = []
    previous: list[int] | None = None  # the last warm output: its prompt is this repeat's cold prompt
    for i in range(repeats):
        engine = Engine(model, cache, step_tokens)
        ttft, _, cold_out = time_to_first_token(engine, prefix + suffixes[i], new_tokens)
        cold.append(ttft)
        if previous is not None:
            agree.append(cold_out == previous)
        ttft, num_cached, previous = time_to_first_token(engine, prefix + suffixes[i + 1], new_tokens)
        warm.append(ttft)
        cached.append(num_cached)
    return {"cold_s": cold, "warm_s": warm, "cached_tokens": cached, "outputs_agree": agree}


def run_prefix_bench(
    model_name: str,
    prefix_len: int,
    suffix_len: int,
    new_tokens: int,
    repeats: int,
    out: Path,
    report: Path,
    *,
    command: str = "kvengine bench prefix",
) -> list[dict]:
    """Measure, append JSON rows to `out` and a table to `report` (headed by `command`); returns the rows."""
    model = load(model_name)
    res = measure_prefix_ttft(model, prefix_len, suffix_len, new_tokens, repeats)
    cold, warm = statistics.median(res["cold_s"]), statistics.median(res["warm_s"])
    cfg = dict(model=model.name, prefix_len=prefix_len, suffix_len=suffix_len, repeats=repeats)
    rows = [
        make_row("prefix", "ttft_s", cold, "s", cache="cold", **cfg),
        make_row("prefix", "ttft_s", warm, "s", cache="warm", cached_tokens=res["cached_tokens"], **cfg),
    ]
    append_rows(out, rows)
    body = markdown_table(
        [
            "prefix tokens",
            "suffix tokens",
            "TTFT cold (s)",
            "TTFT cached prefix (s)",
            "speedup",
            "tokens reused",
        ],
        [
            [
                prefix_len,
                suffix_len,
                f"{cold:.3f}",
                f"{warm:.4f}",
                f"{cold / warm:.1f}",
                min(res["cached_tokens"]),
            ]
        ],
    )
    print(body)
    append_report(
        report,
        "Time to first token with a cached prefix vs cold",
        command,
        body,
        f"Model {model.name}, fp32, median of {repeats} fresh engines (cold request, then a warm one with "
        f"another suffix); the whole prompt is prefilled in one step. Warm outputs equal cold outputs of "
        f"the same prompt: {all(res['outputs_agree'])} ({len(res['outputs_agree'])} compared).",
    )
    return rows
