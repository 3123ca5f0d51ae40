"""The fused decode step (engine/fused.py, fused_step.cpp) against the model's own modules.

Every decode step it takes must give the logits and cache the eager path
gives (the model's forward through kvengine's attention), in float32, bfloat16
and with int8 / int4 weights; the engine's greedy tokens must equal
transformers' `generate`; the models and pools it cannot serve are refused.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_model, use_sdpa
from test_engine import random_prompt

from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine import fused, linear
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.engine.runner import ModelRunner, StepInput
from kvengine.engine.weights import quantize_weights
from kvengine.models import LoadedModel

pytestmark = pytest.mark.skipif(
    fused.fused_decode_op() is None, reason="the fused decode kernel cannot be built here"
)

FUSED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def _model(family: str, dtype: torch.dtype = torch.float32, bits: int | None = None) -> LoadedModel:
    overrides: dict[str, object] = {"sliding_window": None} if family == "mistral" else {}
    if family == "qwen2":
        overrides["attention_bias"] = True  # Qwen2's q/k/v biases go through the op too
    model = tiny_model(family, seed=3, **overrides)
    model.hf_model.to(dtype)
    if bits is not None:
        quantize_weights(model.hf_model, bits)
    return model


class Counting:
    """Wraps a runner's fused step and counts its calls."""

    def __init__(self, runner: ModelRunner) -> None:
        assert runner._fused is not None, "the fused step was refused"
        self.inner, self.calls = runner._fused, 0
        runner._fused = self  # type: ignore[assignment]

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(*args)  # type: ignore[arg-type]


def _decode_logits(
    model: LoadedModel, prompts: list[list[int]], steps: int, use_fused: bool
) -> list[torch.Tensor]:
    """Logits of `steps` greedy decode steps of all prompts together, and each step's pool contents."""
    engine = Engine(model, CacheConfig(max_kv_bytes=16 * 2**20), SchedulerConfig(max_step_tokens=2048))
    runner = engine.runner
    counter = Counting(runner) if use_fused else None
    if not use_fused:
        runner._fused = None
    kvs = [engine.cache.new_sequence() for _ in prompts]
    runner.forward([StepInput(kv, p, 0) for kv, p in zip(kvs, prompts, strict=True)])
    tokens = [p[-1] for p in prompts]
    out = []
    for step in range(steps):
        batch = [StepInput(kv, [t], len(p) + step) for kv, p, t in zip(kvs, prompts, tokens, strict=True)]
        logits = runner.forward(batch)
        out.append(logits)
        tokens = logits.argmax(-1).tolist()
    slots, _ = kvs[0].context(0)
    out.append(engine.pool.k[slots.reshape(-1)].float())  # the first sequence's keys of layer 0
    if counter is not None:
        assert counter.calls == steps
    return out


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_step_equals_the_model_forward_fp32(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(family)
    # 11 rows: past MAX_ROWS (lowered here to keep the case small), where plain weights take ATen's
    # GEMM inside the op
    monkeypatch.setattr(linear, "MAX_ROWS", 8)
    prompts = [random_prompt(n, 10 + n) for n in (5, 40, 17, 2, 9, 23, 31, 8, 12, 50, 3)]
    fused_out = _decode_logits(model, prompts, 4, use_fused=True)
    eager_out = _decode_logits(model, prompts, 4, use_fused=False)
    for a, b in zip(fused_out, eager_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_step_with_quantized_weights(bits: int) -> None:
    model = _model("llama", bits=bits)
    prompts = [random_prompt(n, 50 + n) for n in (9, 33)]
    for a, b in zip(
        _decode_logits(model, prompts, 3, use_fused=True),
        _decode_logits(model, prompts, 3, use_fused=False),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_step_rounds_like_the_bf16_model() -> None:
    """In bfloat16 each intermediate is rounded where the eager model rounds it: the logits agree to
    a few bf16 steps (float32 sums in another order are all that differ), not to bf16-vs-fp32 error."""
    model = _model("llama", torch.bfloat16)
    prompts = [random_prompt(n, 70 + n) for n in (12, 30)]
    fused_out = _decode_logits(model, prompts, 3, use_fused=True)
    eager_out = _decode_logits(model, prompts, 3, use_fused=False)
    fp32 = _decode_logits(_model("llama"), prompts, 1, use_fused=False)[0]
    for a, b in zip(fused_out, eager_out, strict=True):
        assert float((a - b).abs().max()) <= 4 * 2**-8 * float(b.abs().max())
    # ...and closer to the eager bf16 model than bf16 is to float32
    assert float((fused_out[0] - eager_out[0]).abs().max()) < float((eager_out[0] - fp32).abs().max())


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_engine_greedy_tokens_equal_generate(family: str) -> None:
    """Mixed-length requests decoding together take the fused step; each equals generate alone."""
    model = _model(family)
    engine = Engine(model, CacheConfig(max_kv_bytes=16 * 2**20), SchedulerConfig(max_step_tokens=4096))
    counter = Counting(engine.runner)
    prompts = [random_prompt(n, 200 + n) for n in (3, 57, 120, 31, 88)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    assert counter.calls >= 11
    for prompt, out in zip(prompts, outs, strict=True):
        with use_sdpa(model) as hf, torch.inference_mode():
            ref = hf.generate(
                torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
            )
        assert out.output_ids == ref[0, len(prompt) :].tolist()
    assert engine.pool.num_used_blocks == 0


def test_refused_models_and_pools() -> None:
    """Families, windows, activations and pools the op does not implement fall back, saying why."""
    llama = _model("llama")
    engine = Engine(llama, CacheConfig(max_kv_bytes=4 * 2**20))
    pool = engine.pool
    assert fused._refusal(llama, pool, has_windows=False) is None
    assert "sliding-window" in str(fused._refusal(llama, pool, has_windows=True))
    other = copy.copy(llama)
    other.adapter = dataclasses.replace(llama.adapter, family="gemma3")
    assert "gemma3" in str(fused._refusal(other, pool, has_windows=False))
    gelu = copy.deepcopy(llama)
    gelu.hf_model.config.hidden_act = "gelu"
    assert "silu" in str(fused._refusal(gelu, pool, has_windows=False))
    packed = Engine(llama, CacheConfig(max_kv_bytes=4 * 2**20, kv_bits=4)).pool
    assert "pool" in str(fused._refusal(llama, packed, has_windows=False))
    mistral = Engine(tiny_model("mistral"), CacheConfig(max_kv_bytes=4 * 2**20))  # sliding_window=24
    assert mistral.runner._fused is None


def test_env_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVENGINE_FUSED", "off")
    engine = Engine(_model("llama"), CacheConfig(max_kv_bytes=4 * 2**20))
    assert engine.runner._fused is None
    assert "KVENGINE_FUSED" in str(fused._refusal(engine.model, engine.pool, has_windows=False))


def test_the_op_names_bad_arguments() -> None:
    op = fused.fused_decode_op()
    h = torch.zeros(1, 8)
    with pytest.raises(RuntimeError, match="fused_decode: expected 2L \\+ 1 norm weights"):
        op(h, [h[0]], [], [], [0] * 7, torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(4, 4), torch.zeros(4, 4),
           torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long),
           torch.zeros(1, 1, 1, dtype=torch.long), 1, 1, 1e-6, 1.0, 8)  # fmt: skip
