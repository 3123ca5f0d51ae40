"""`make demo`: one question about a long document, answered through the paged KV cache.

The document is the needle task's haystack (a town's yearly records) with
one fact, an access code, in the middle. The model is asked for the code; the
demo prints the answer and what it cost.
"""

from __future__ import annotations

import time

from kvengine.bench.needle import is_correct, make_needle_example
from kvengine.engine.generate import generate
from kvengine.models import load


def run_demo(model_name: str, doc_tokens: int) -> None:
    """Print the question, the answer streamed, and the cost in bytes and time."""
    t0 = time.perf_counter()
    model = load(model_name)
    print(
        f"model: {model.name} ({model.num_layers} layers, {model.num_kv_heads} kv-heads, "
        f"head dim {model.head_dim}), loaded in {time.perf_counter() - t0:.1f} s"
    )
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
