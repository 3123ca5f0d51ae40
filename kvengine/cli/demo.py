"""`make demo`: one question about a long document, then a small comparison of presses.

The document is the needle task's haystack (a town's yearly records) with
one fact, an access code, in the middle. The model is asked for the code; the
demo prints the answer and what it cost. Then (unless `compare=False`) a few
presses compress a few needle contexts by half through `kvengine eval`'s
machinery, and the demo prints their accuracy, KV bytes held and time as a
Markdown table and plots accuracy against bytes. It is a taste, not a
benchmark: `kvengine eval` is the benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path

from kvengine.config import default_cache_dir
from kvengine.engine.generate import generate
from kvengine.eval.needle import is_correct, make_needle_example
from kvengine.eval.plots import plot_accuracy_vs_bytes
from kvengine.eval.runner import EvalConfig, run_eval
from kvengine.eval.summary import Summary, label, summarize
from kvengine.models import LoadedModel, load
from kvengine.models.precision import dtype_name
from kvengine.results import markdown_table

COMPARE_PRESSES = ("none", "knorm", "streaming_llm", "snapkv", "expected_attention")


def compare_presses(
    model: LoadedModel,
    out_dir: Path,
    length: int = 2048,
    num_examples: int = 4,
    ratio: float = 0.5,
    kivi: int = 2,
    max_new_tokens: int = 20,
) -> tuple[str, Path | None]:
    """Needle accuracy, KV bytes held and seconds per example for `COMPARE_PRESSES` at `ratio` and KIVI.

    Rows go to `out_dir/demo_eval.jsonl` (replaced, so times are this run's);
    returns the Markdown table and the PNG plot written (None when matplotlib,
    the `plots` extra, is not installed).
    """
    results = out_dir / "demo_eval.jsonl"
    results.unlink(missing_ok=True)
    cfg = EvalConfig(
        ("niah_single",), (length,), COMPARE_PRESSES, (ratio,), (kivi,), num_examples, 0, max_new_tokens
    )
    summaries = [s for s in summarize(run_eval(model, cfg, results)) if s.task == "all"]
    table = markdown_table(
        ["cache", "ratio", "accuracy", "KV MiB held", "KV bytes / full", "s / example"],
        [_line(s) for s in summaries],
    )
    try:
        import matplotlib  # noqa: F401  (only to learn whether the plots extra is installed)
    except ImportError:
        return table, None
    plot = out_dir / "demo_accuracy_vs_kv_bytes.png"
    plot_accuracy_vs_bytes(summaries, plot)
    return table, plot


def _line(s: Summary) -> list[str]:
    ratio = f"{s.setting[1]:.2f}" if s.setting[0] != "none" else "-"
    return [
        label(s.setting),
        ratio,
        f"{s.accuracy:.2f}",
        f"{s.kv_mib:.1f}",
        f"{s.kv_fraction:.3f}",
        f"{s.seconds:.1f}",
    ]


def run_demo(
    model_name: str,
    doc_tokens: int,
    compare: bool = True,
    out_dir: Path | None = None,
    dtype: str = "auto",
    device: str = "auto",
    weights: str = "model",
) -> None:
    """Print the question, the answer streamed, and the cost in bytes and time; then compare presses.

    The comparison's files go to `out_dir` (default: `<cache dir>/demo`).
    """
    t0 = time.perf_counter()
    model = load(model_name, dtype=dtype, device=device, weights=weights)
    print(
        f"model: {model.name} ({model.num_layers} layers, {model.num_kv_heads} kv-heads, "
        f"head dim {model.head_dim}), loaded in {time.perf_counter() - t0:.1f} s"
    )
    weights = "" if model.weights == "model" else f", weights {model.weights}"
    print(f"precision: {dtype_name(model.dtype)} ({model.dtype_reason}){weights}, device {model.device}")
    example = make_needle_example(model, doc_tokens, depth=0.5, seed=0)
    print(
        f"document: {example.num_tokens} tokens of town records, one line of which says: {example.needle!r}"
    )
    print(f"question: {example.question}")
    print("answer:   ", end="", flush=True)
    completion = generate(
        model,
        example.context,
        questions=[example.question],
        max_tokens=24,
        on_text=lambda _, text: print(text, end="", flush=True),
    )[0]
    print()
    per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim * model.dtype.itemsize
    print(f"correct:  {'yes' if is_correct(example, completion.text) else 'no'} (expected {example.answer})")
    print(
        f"KV cache: {completion.kv_bytes / 2**20:.1f} MiB held for {completion.num_prompt_tokens} prompt "
        f"+ {len(completion.token_ids)} generated tokens ({per_token / 1024:.1f} KiB per token)"
    )
    print(
        f"time to first token: {completion.ttft_s:.2f} s "
        f"({completion.num_prompt_tokens / max(completion.ttft_s, 1e-9):.0f} prompt tokens/s)"
    )
    print(f"decode: {completion.decode_tokens_per_s:.1f} tokens/s")
    if compare:
        _print_comparison(model, out_dir or default_cache_dir() / "demo")


def _print_comparison(model: LoadedModel, out_dir: Path) -> None:
    num_examples, length = 4, 2048
    print(
        f"\ncomparing presses: {len(COMPARE_PRESSES) - 1} presses evicting half the cache, and 2-bit KIVI, "
        f"on {num_examples} needle contexts of {length} tokens (skip with --no-compare)"
    )
    start = time.perf_counter()
    table, plot = compare_presses(model, out_dir, length, num_examples)
    print(f"\n{table}\n")
    print(f"rows: {out_dir / 'demo_eval.jsonl'}")
    print(
        f"plot: {plot}" if plot else "plot: skipped (install the plots extra: pip install 'kvengine[plots]')"
    )
    print(f"comparison took {time.perf_counter() - start:.0f} s; `kvengine eval` runs the full benchmark")
