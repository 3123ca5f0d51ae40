"""`kvengine bench decode`: prefill and decode speed, kvengine vs transformers' generate.

Both systems run the same prompt (a needle-task document, cut to the exact
length) on the same model object, one request at a time, greedy, with the
same number of new tokens; runs alternate between the systems so that drift
of this noisy machine hits both. transformers runs with its own dynamic cache
and SDPA attention. Time stamps come from the step loop itself (a logits
processor for transformers, `Engine.step` for kvengine): prefill time is
from the call to the first token, decode speed is tokens after the first
over the time after the first.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.eval.needle import make_needle_example
from kvengine.models import LoadedModel, load
from kvengine.results import append_report, append_rows, make_row, markdown_table


class _StepClock(LogitsProcessor):
    """Records the time of each decoding step of transformers' generate."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


def time_transformers(model: LoadedModel, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of transformers' generate."""
    hf = model.hf_model
    saved = hf.config._attn_implementation
    hf.set_attn_implementation("sdpa")
    clock = _StepClock()
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            hf.generate(  # type: ignore[operator]
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=0,
            )
    finally:
        hf.set_attn_implementation(saved)
    return clock.times[0] - start, (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def time_kvengine(model: LoadedModel, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of kvengine's engine, one request."""
    engine = Engine(
        model,
        CacheConfig(max_kv_bytes=2 * 2**30),
        SchedulerConfig(max_num_seqs=1, max_step_tokens=len(prompt)),
    )
    engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    start = time.perf_counter()
    engine.step()
    first = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return first - start, steps / (time.perf_counter() - first)


def run_decode_bench(
    model_name: str,
    lengths: list[int],
    new_tokens: int,
    repeats: int,
    out: Path,
    report: Path,
    *,
    command: str = "kvengine bench decode",
) -> list[dict]:
    """Measure, append JSON rows to `out` and a table to `report` (headed by `command`); returns the rows."""
    model = load(model_name)
    doc = make_needle_example(model, max(lengths) + 64, depth=0.5, seed=0).context
    doc_ids = model.tokenizer.encode(doc) if model.tokenizer else []
    systems = {"transformers": time_transformers, "kvengine": time_kvengine}
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    runs = [(n, r, s) for n in lengths for r in range(repeats) for s in systems]
    for n, _, system in tqdm(runs, desc="bench decode", unit="run"):
        prompt = doc_ids[:n]
        results.setdefault((system, n), []).append(systems[system](model, prompt, new_tokens))
    rows, table = [], []
    for n in lengths:
        med = {s: tuple(statistics.median(x[i] for x in results[(s, n)]) for i in (0, 1)) for s in systems}
        for s, (prefill_s, decode_tps) in med.items():
            cfg = dict(system=s, model=model.name, prompt_len=n, new_tokens=new_tokens, repeats=repeats)
            rows.append(make_row("decode", "prefill_tokens_per_s", n / prefill_s, "tok/s", **cfg))
            rows.append(make_row("decode", "decode_tokens_per_s", decode_tps, "tok/s", **cfg))
        kv, hf = med["kvengine"], med["transformers"]
        table.append([
            n,
            f"{n / kv[0]:.0f}", f"{n / hf[0]:.0f}", f"{hf[0] / kv[0]:.2f}",
            f"{kv[1]:.1f}", f"{hf[1]:.1f}", f"{kv[1] / hf[1]:.2f}",
        ])  # fmt: skip
    append_rows(out, rows)
    header = [
        "prompt tokens",
        "prefill tok/s kvengine", "prefill tok/s transformers", "prefill ratio",
        "decode tok/s kvengine", "decode tok/s transformers", "decode ratio",
    ]  # fmt: skip
    body = markdown_table(header, table)
    print(body)
    append_report(
        report,
        "Prefill and decode speed vs transformers' generate",
        command,
        body,
        f"Model {model.name}, fp32, batch 1, greedy, {new_tokens} new tokens, median of {repeats} "
        "alternating runs; ratio > 1 means kvengine is faster.",
    )
    return rows
