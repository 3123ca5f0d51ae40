"""Sliding windows over token positions after compression; sliding layers hold only their window.

A query at position p of a sliding-window layer sees the keys at positions
> p - window. After a press has evicted tokens, a key's index in the cache is
no longer its position, so the window must be applied over the positions the
cache records. Reference: transformers' own layers over exactly the tokens the
press kept, per layer and kv-head, with `KeptTokens` (a test-only attention
function registered with transformers) applying the window over positions.
The models: a tiny random Gemma3-style text model (sliding and full layers
mixed) and the tiny Mistral of conftest (every layer windowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TINY, hf_greedy, hf_logits, tiny_model
from test_engine import random_prompt
from transformers import AttentionInterface

from kvengine.cache.paged import PagedKVCache
from kvengine.cache.pool import BlockPool
from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.engine.runner import ModelRunner, StepInput
from kvengine.models import LoadedModel
from kvengine.press import Press, PressInput, make_press

GEMMA_WINDOW = 16
MISTRAL_WINDOW = 24  # conftest's tiny Mistral
BLOCK = 8


def tiny_gemma3(seed: int = 0) -> LoadedModel:
    """A random Gemma3-style text model: layers 0 and 2 slide over 16 tokens, layer 1 sees all."""
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(
        **TINY,
        sliding_window=GEMMA_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16,
        tie_word_embeddings=False,  # the logits are sharpened below, the embeddings are not
    )
    hf = transformers.Gemma3ForCausalLM(config).float()
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
    return LoadedModel.from_hf(hf, name="tiny-gemma3")


def windowed(family: str) -> tuple[LoadedModel, int]:
    return (tiny_gemma3(), GEMMA_WINDOW) if family == "gemma3" else (tiny_model("mistral"), MISTRAL_WINDOW)


@dataclass
class Recording(Press):
    """Test press: keeps what `press` keeps and records it, `kept[layer]` = per kv-head indices."""

    press: Press
    # Out of the repr: the prefix cache keys a compressed context by the press's repr.
    kept: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ratio(self) -> float:  # type: ignore[override]
        return self.press.ratio

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        self.kept[inp.layer] = self.press.keep(inp)
        return self.kept[inp.layer]


def build_press(spec: str, window: int) -> Press:
    """`spec` at ratio 0.5. StreamingLLM gets 3/4 of a window of sinks: with its default 4,
    the recent run it keeps is longer than the window and cache index and position agree
    inside every window, so the test would not tell them apart."""
    if spec == "snapkv":
        return make_press("snapkv", ratio=0.5, window_size=8)
    if spec == "streaming_llm":
        return make_press("streaming_llm", ratio=0.5, n_sink=3 * window // 4)
    return make_press(spec, ratio=0.5)


class KeptTokens:
    """Attention as transformers' eager forward computes it, over the kept tokens only.

    Token i sits at position i. A query at p sees keys at positions <= p, and
    > p - window in a layer with a window (the `sliding_window` transformers
    passes). Queries past the context (p >= `context_len`) see, of the
    context, only the tokens the press kept in their (layer, kv-head):
    `kept[layer][head]`, positions; all when `kept` is None.
    """

    NAME = "kvengine_test_kept_tokens"

    def __init__(self, context_len: int, kept: dict[int, list[torch.Tensor]] | None) -> None:
        self.context_len, self.kept = context_len, kept

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: object,
        scaling: float,
        sliding_window: int | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        """query `(1, H_q, n, D)`, key and value `(1, H_kv, n, D)` -> `(1, n, H_q, D)`; no weights."""
        _, num_heads, n, _ = query.shape
        group = num_heads // key.shape[1]
        pos = torch.arange(n)
        visible = pos[None, :] <= pos[:, None]  # (n_q, n_k)
        if sliding_window is not None:
            visible &= pos[None, :] > pos[:, None] - sliding_window
        out = torch.empty_like(query[0])  # (H_q, n, D)
        for h in range(num_heads):
            seen = visible.clone()
            if self.kept is not None:
                evicted = pos < self.context_len
                evicted[self.kept[module.layer_idx][h // group]] = False  # type: ignore[index]
                seen[self.context_len :, evicted] = False
            q, k, v = query[0, h], key[0, h // group], value[0, h // group]
            scores = (q @ k.T * scaling).masked_fill(~seen, -torch.inf)
            out[h] = torch.softmax(scores, -1) @ v
        return out.transpose(0, 1)[None], None


def reference_logits(
    model: LoadedModel, ids: list[int], context_len: int, kept: dict[int, list[torch.Tensor]] | None
) -> torch.Tensor:
    """Logits `(T, V)` of transformers' forward over `ids` with `KeptTokens` as the attention."""
    AttentionInterface.register(KeptTokens.NAME, KeptTokens(context_len, kept))
    hf = model.hf_model
    saved = hf.config._attn_implementation
    hf.set_attn_implementation(KeptTokens.NAME)
    try:
        with torch.inference_mode():
            return hf(torch.tensor([ids]), use_cache=False).logits[0].float()
    finally:
        hf.set_attn_implementation(saved)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_the_reference_without_a_press_is_transformers_own_forward(family: str) -> None:
    """`KeptTokens` keeping everything equals transformers' SDPA forward with its own window masks."""
    model, window = windowed(family)
    ids = random_prompt(3 * window + 7, 0)
    torch.testing.assert_close(
        reference_logits(model, ids, 3 * window, None), hf_logits(model, ids), atol=1e-4, rtol=1e-4
    )


def greedy_after_press(
    runner: ModelRunner,
    contexts: list[list[int]],
    questions: list[list[int]],
    presses: list[Press],
    steps: int,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Sequences prefilled and compressed together, then their questions, then `steps` greedy
    tokens decoded together (sliding layers dropping what no query sees after every step).
    Returns each one's tokens that went through the model and its logits `(1 + steps, V)`."""
    kvs = [runner.cache.new_sequence() for _ in contexts]
    prefill = zip(kvs, contexts, presses, strict=True)
    runner.forward([StepInput(kv, c, 0, press=p, free_outside_window=True) for kv, c, p in prefill])
    ids = [c + q for c, q in zip(contexts, questions, strict=True)]
    starts = [len(c) for c in contexts]
    logits: list[list[torch.Tensor]] = [[] for _ in kvs]
    new = questions
    for _ in range(1 + steps):
        out = runner.forward(
            [StepInput(kv, n, s, free_outside_window=True) for kv, n, s in zip(kvs, new, starts, strict=True)]
        )
        starts = [s + len(n) for s, n in zip(starts, new, strict=True)]
        new = [[int(row.argmax())] for row in out]
        for i, row in enumerate(out):
            logits[i].append(row)
            ids[i].extend(new[i])
    for kv in kvs:
        runner.cache.free(kv)
    return [seq[:-1] for seq in ids], [torch.stack(rows) for rows in logits]


@pytest.mark.parametrize("spec", ["knorm", "snapkv", "streaming_llm", "expected_attention"])
@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_windows_after_a_press_match_transformers_over_the_kept_tokens(family: str, spec: str) -> None:
    """Context 3x the window, press at 0.5, a 5-token question (a chunk after the compressed
    cache), 4 greedy tokens. Two sequences decode together (the batched decode path); a third,
    alone (the per-span path). Logits and tokens equal the reference over the kept tokens.
    (Expected Attention needs each layer's RoPE: Gemma3's differs between layer types.)"""
    model, window = windowed(family)
    runner = ModelRunner(
        model, PagedKVCache(BlockPool(2048, BLOCK, model.head_dim), model.num_layers, model.num_kv_heads)
    )
    context_len = 3 * window
    contexts = [random_prompt(context_len, seed) for seed in (1, 2, 3)]
    questions = [random_prompt(5, seed) for seed in (4, 5, 6)]
    presses = [Recording(build_press(spec, window)) for _ in contexts]
    together = greedy_after_press(runner, contexts[:2], questions[:2], presses[:2], steps=4)
    alone = greedy_after_press(runner, contexts[2:], questions[2:], presses[2:], steps=4)
    assert runner.cache.pool.num_used_blocks == 0
    for ids, logits, press in zip(together[0] + alone[0], together[1] + alone[1], presses, strict=True):
        expected = reference_logits(model, ids, context_len, press.kept)[context_len + 4 :]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        assert ids[context_len + 5 :] == expected[:-1].argmax(-1).tolist()


def ask(engine: Engine, context: list[int], question: list[int], press: Press) -> list[int]:
    """Greedy tokens of `context + question` with `context` compressed by `press`, through `engine`."""
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    seq_id = engine.add_request(context + question, params, press=press, context_len=len(context))
    while engine.has_unfinished():
        engine.step()
    engine.check_invariants()
    return engine.release(seq_id).output_ids


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_engine_greedy_after_a_press_matches_the_reference(family: str, tmp_path: Path) -> None:
    """Through the engine, with the prefix cache keeping the compressed context (and a disk
    tier): a first request, a second that reuses the kept context, and a third in a restarted
    engine that reads it back from disk all give the reference's tokens over what was kept."""
    model, window = windowed(family)
    config = CacheConfig(
        block_size=BLOCK,
        max_kv_bytes=16 * 2**20,
        prefix_cache=True,
        tiers="disk",
        disk_tier_dir=str(tmp_path),
    )
    context = random_prompt(3 * window, 7)
    press = Recording(make_press("knorm", ratio=0.5))
    engine = Engine(model, config)
    questions = [random_prompt(6, 8), random_prompt(3, 9), random_prompt(4, 10)]
    outputs = [ask(engine, context, q, press) for q in questions[:2]]
    assert engine.prefix is not None and engine.prefix.compressed.num_hits == 1
    engine.close()
    restarted = Engine(model, config)
    outputs.append(ask(restarted, context, questions[2], press))
    assert restarted.stats()["compressions_total"] == 0  # read back from disk
    restarted.close()
    for question, output in zip(questions, outputs, strict=True):
        ids = context + question + output
        expected = reference_logits(model, ids[:-1], len(context), press.kept)
        assert output == expected[len(context + question) - 1 :].argmax(-1).tolist()


def test_sliding_layers_hold_a_bounded_window_while_full_layers_grow(no_leaks: list) -> None:
    """Gemma3-style, 40 prompt tokens and 64 generated: after every step each sliding-layer
    head holds only the blocks that reach into the window of the next query, each full-layer
    head holds the whole sequence, and the pool's bytes are exactly that; the tokens equal
    transformers' `generate` (dropping what no query sees changes nothing)."""
    model = tiny_gemma3()
    engine = Engine(model, CacheConfig(block_size=BLOCK, max_kv_bytes=16 * 2**20))
    no_leaks.append(engine)
    prompt = random_prompt(40, 11)
    seq_id = engine.add_request(prompt, SamplingParams(max_tokens=64, ignore_eos=True))
    seq = engine.sequences[seq_id]
    sliding = [0, 2]
    peak = {"sliding": 0, "full": 0}
    while engine.has_unfinished():
        engine.step()
        if seq.kv is None or seq.is_finished:
            continue
        next_pos = seq.num_computed
        blocks = seq.kv.num_blocks  # (L, H)
        full_blocks = -(-next_pos // BLOCK)
        # Blocks wholly at positions <= next_pos - window are gone; the rest stays.
        window_blocks = full_blocks - max(0, next_pos - GEMMA_WINDOW + 1) // BLOCK
        for layer in range(model.num_layers):
            want = window_blocks if layer in sliding else full_blocks
            assert blocks[layer].tolist() == [want] * model.num_kv_heads, (layer, next_pos)
        assert engine.pool.bytes_in_use == int(blocks.sum()) * engine.pool.bytes_per_block
        peak["sliding"] = max(peak["sliding"], int(blocks[sliding].sum()))
        peak["full"] = max(peak["full"], int(blocks[1].sum()))
    num_tokens = len(prompt) + 62  # cached after the last step before the one that finishes it
    assert peak["full"] == model.num_kv_heads * -(-num_tokens // BLOCK)  # grows with the sequence
    # Bounded by the window: at most ceil((window - 1) / block) + 1 blocks per head.
    assert peak["sliding"] <= len(sliding) * model.num_kv_heads * (-(-(GEMMA_WINDOW - 1) // BLOCK) + 1)
    assert seq.output_ids == hf_greedy(model, prompt, 64)
