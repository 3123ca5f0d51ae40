"""Shared fixtures: tiny random models of each family, the bundled model, HF references.

`pytest --device cuda` (tools/gpu_check.sh) puts the tiny and bundled models, and so the engines
built on them, on that device; the default is the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import transformers

from kvengine.models import LoadedModel
from kvengine.models.device import resolve_device

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker: two workers with two threads each on two cores thrash.
    torch.set_num_threads(1)

DEVICE = torch.device("cpu")  # where test models run: `--device`, set in pytest_configure


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", default="cpu", help="device the tiny and bundled test models run on (cpu, cuda, ...)"
    )


def pytest_configure(config: pytest.Config) -> None:
    global DEVICE
    DEVICE = resolve_device(config.getoption("--device"))


TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 24}),
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides: object) -> LoadedModel:
    """A random model of `family` with 3 layers and GQA (4 query heads, 2 kv-heads), fp32, on `DEVICE`."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    hf = model_cls(config).float()
    # Random init gives near-uniform logits; sharpen them so greedy decoding has clear winners.
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
    return LoadedModel.from_hf(hf.to(DEVICE), name=f"tiny-{family}")


@pytest.fixture(params=list(FAMILIES))
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    return tiny_model(request.param)


@pytest.fixture
def tiny_llama() -> LoadedModel:
    return tiny_model("llama")


@pytest.fixture(scope="session")
def bundled() -> LoadedModel:
    """The bundled SmolLM2-135M (converted once into the user's cache directory)."""
    from kvengine.models import load

    # float32 whatever the hardware: exact references
    return load("smollm2-135m", dtype="float32", device=DEVICE, progress=False)


class use_sdpa:
    """Run a model with transformers' own SDPA attention inside the block (the reference)."""

    def __init__(self, model: LoadedModel) -> None:
        self.hf = model.hf_model
        self.saved = self.hf.config._attn_implementation

    def __enter__(self) -> transformers.PreTrainedModel:
        self.hf.set_attn_implementation("sdpa")
        return self.hf

    def __exit__(self, *exc: object) -> None:
        self.hf.set_attn_implementation(self.saved)


def hf_greedy(model: LoadedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers' `generate` with its own dynamic cache."""
    with use_sdpa(model) as hf, torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt], device=hf.device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=hf.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(model.eos_token_ids) or None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def hf_logits(model: LoadedModel, tokens: list[int]) -> torch.Tensor:
    """Logits `(T, V)` of a full forward pass with transformers' SDPA attention."""
    with use_sdpa(model) as hf, torch.inference_mode():
        return hf(torch.tensor([tokens], device=hf.device), use_cache=False).logits[0].float()


@pytest.fixture
def no_leaks() -> Iterator[list]:
    """Collects engines a test creates and checks every block went back to the pool."""
    engines: list = []
    yield engines
    for engine in engines:
        engine.pool.check_invariants()
        assert engine.pool.num_used_blocks == 0, "blocks leaked"
