"""`make demo`: one question about a long document, answered through the paged KV cache.

The document is built deterministically: a town's yearly records, each line
a small fact, with one fact (the needle) placed in the middle. The model is
asked about the needle; the demo prints the answer and what it cost.
"""

from __future__ import annotations

import random
import time

from kvengine.engine.generate import generate
from kvengine.models import LoadedModel, load

_PLACES = ["the mill", "the harbour", "the old bridge", "the library", "the market", "the school"]
_EVENTS = [
    "repainted its doors",
    "held a spring fair",
    "hired two new keepers",
    "was closed for repairs",
    "opened a reading room",
    "planted a row of linden trees",
]
NEEDLE = "The access code of the archive room is 7429."
QUESTION = "What is the access code of the archive room? Answer with the number only."
ANSWER = "7429"


def build_document(model: LoadedModel, num_tokens: int, seed: int = 0) -> str:
    """A document of about `num_tokens` tokens with NEEDLE in its middle."""
    if model.tokenizer is None:
        raise ValueError("the demo needs a model with a tokenizer")
    rng = random.Random(seed)
    lines: list[str] = []
    year = 1850
    while True:
        place, event = rng.choice(_PLACES), rng.choice(_EVENTS)
        lines.append(f"In {year}, {place} {event}.")
        year += 1
        if len(model.tokenizer.encode(" ".join(lines))) >= num_tokens:
            break
    lines.insert(len(lines) // 2, NEEDLE)
    return " ".join(lines)


def run_demo(model_name: str, doc_tokens: int) -> None:
    """Print the question, the answer streamed, and the cost in bytes and time."""
    t0 = time.perf_counter()
    model = load(model_name)
    print(
        f"model: {model.name} ({model.num_layers} layers, {model.num_kv_heads} kv-heads, "
        f"head dim {model.head_dim}), loaded in {time.perf_counter() - t0:.1f} s"
    )
    document = build_document(model, doc_tokens)
    prompt = f"{document}\n\n{QUESTION}"
    print(f"document: {doc_tokens} tokens of town records, one line of which says: {NEEDLE!r}")
    print(f"question: {QUESTION}")
    print("answer:   ", end="", flush=True)
    completion = generate(
        model,
        prompt,
        max_tokens=16,
        on_text=lambda _, text: print(text, end="", flush=True),
    )[0]
    print()
    per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim * model.dtype.itemsize
    print(f"correct:  {'yes' if ANSWER in completion.text else 'no'} (expected {ANSWER})")
    print(
        f"KV cache: {completion.kv_bytes / 2**20:.1f} MiB held for {completion.num_prompt_tokens} prompt "
        f"+ {len(completion.token_ids)} generated tokens ({per_token / 1024:.1f} KiB per token)"
    )
    print(
        f"time to first token: {completion.ttft_s:.2f} s "
        f"({completion.num_prompt_tokens / max(completion.ttft_s, 1e-9):.0f} prompt tokens/s)"
    )
    print(f"decode: {completion.decode_tokens_per_s:.1f} tokens/s")
