"""Linear layers for a few rows (linear.py / small_linear.cpp) against a float64 reference.

The op is checked for every weight dtype it takes, every row count up to and
past its groups of four, head dims that are not a multiple of its vector
width, with and without bias. The patched modules must take the kernel only
while kvengine drives the model: the model's own forward passes keep
`F.linear`, bit for bit. Engine-level greedy equality with transformers on
this path is covered by the engine tests, which run on it by default.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_greedy, tiny_model
from test_engine import random_prompt
from torch import nn

from kvengine.cache.paged import PagedKVCache
from kvengine.cache.pool import BlockPool
from kvengine.config import CacheConfig, ModelConfig
from kvengine.engine import linear, weights
from kvengine.engine.engine import Engine
from kvengine.engine.linear import SmallBatchLinear, driving, small_linear_op, use_small_linear
from kvengine.engine.request import SamplingParams
from kvengine.engine.runner import ModelRunner
from kvengine.errors import InvalidRequestError
from kvengine.models import load

OP = small_linear_op()
needs_kernel = pytest.mark.skipif(OP is None, reason="the small-batch linear kernel could not be built here")


@needs_kernel
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("k", [64, 77])
def test_the_op_matches_a_float64_product(wdtype: torch.dtype, rows: int, k: int) -> None:
    gen = torch.Generator().manual_seed(rows * 100 + k)
    weight = torch.randn(301, k, generator=gen).to(wdtype)
    bias = torch.randn(301, generator=gen)
    x = torch.randn(rows, k, generator=gen)
    for b in (None, bias):
        want = x.double() @ weight.double().T + (0 if b is None else b.double())
        got = OP(x, weight, b)
        assert got.dtype == torch.float32 and got.shape == (rows, 301)
        # float32 sums of k products of unit-scale numbers: a few ulps of sqrt(k) per term
        assert (got.double() - want).abs().max().item() < 2e-5 * k**0.5


@needs_kernel
def test_a_16_bit_input_comes_back_in_its_dtype() -> None:
    weight = torch.randn(40, 32).bfloat16()
    x = torch.randn(3, 32).bfloat16()
    got = OP(x, weight, None)
    assert got.dtype == torch.bfloat16
    want = (x.double() @ weight.double().T).bfloat16()
    assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@needs_kernel
def test_the_op_refuses_mismatched_shapes() -> None:
    with pytest.raises(RuntimeError, match="disagree on K"):
        OP(torch.randn(2, 8), torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="bias"):
        OP(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))
    with pytest.raises(RuntimeError, match="contiguous"):
        OP(torch.randn(2, 8), torch.randn(8, 4).T, None)


@needs_kernel
def test_patched_linears_take_the_kernel_only_while_kvengine_drives() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 20)
    assert use_small_linear(nn.Sequential(layer)) == 1
    assert isinstance(layer, SmallBatchLinear)
    x = torch.randn(2, 3, 48)  # 6 rows: the kernel's side of MAX_ROWS
    plain = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), plain)  # outside `driving()`: F.linear itself
    with driving():
        inside = layer(x)
        many = layer(torch.randn(linear.MAX_ROWS + 1, 48))
    assert inside.shape == (2, 3, 20)
    assert torch.allclose(inside, plain, atol=1e-5)
    assert many.shape == (linear.MAX_ROWS + 1, 20)


@needs_kernel
def test_the_kernel_is_really_called_while_driving(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = OP

    def counting(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        calls.append((x.shape[0], w.shape[0]))
        return real(x, w, b)

    layer = nn.Linear(16, 8)
    use_small_linear(layer)
    monkeypatch.setattr(linear, "small_linear_op", lambda: counting)
    with driving():
        layer(torch.randn(3, 16))
        layer(torch.randn(linear.MAX_ROWS + 1, 16))
    layer(torch.randn(3, 16))
    assert calls == [(3, 8)]


@needs_kernel
def test_an_engine_runner_patches_the_model_and_its_own_forward_is_unchanged() -> None:
    model = tiny_model("llama")
    tokens = torch.tensor([[3, 7, 11, 2]])
    with torch.inference_mode():
        before = model.hf_model(input_ids=tokens).logits
    ModelRunner(model, PagedKVCache(BlockPool(64, 4, model.head_dim), model.num_layers, model.num_kv_heads))
    linears = [m for m in model.hf_model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is SmallBatchLinear for m in linears)
    with torch.inference_mode():
        after = model.hf_model(input_ids=tokens).logits
    assert torch.equal(before, after)


def test_int8_rows_are_within_half_a_scale_of_the_weight() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(50, 96, generator=gen) * torch.logspace(-3, 1, 96)  # outlier channels
    q, scales = weights.quantize_rows(weight)
    assert q.dtype == torch.int8 and scales.shape == (50, 3)
    back = (q.view(50, 3, 32).double() * scales.double()[..., None]).view(50, 96)
    bound = scales.double().repeat_interleave(32, dim=1) / 2
    assert ((back - weight.double()).abs() <= bound * (1 + 1e-6)).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        weights.quantize_rows(torch.randn(4, 40))


def test_int4_rows_are_within_half_a_scale_and_unpack_in_order() -> None:
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(20, 64, generator=gen) * torch.logspace(-2, 1, 64)
    packed, scales, mins = weights.quantize_rows4(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (20, 32) and mins.shape == (20, 2)
    # A float64 unpacking written independently: value j of a group is in byte j % 16, low nibble first.
    p = packed.view(20, 2, 16).long()
    q = torch.cat([p & 15, p >> 4], dim=-1)
    back = (q.double() * scales.double()[..., None] + mins.double()[..., None]).view(20, 64)
    bound = scales.double().repeat_interleave(32, dim=1) / 2
    assert ((back - weight.double()).abs() <= bound * (1 + 1e-5) + 1e-7).all()
    layer = nn.Linear(64, 20, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    assert torch.allclose(weights.QuantLinear(layer, 4).dequantized(torch.float64), back, atol=1e-6)


def test_int4_of_values_already_on_a_4_bit_grid_gives_them_back() -> None:
    # The bundled GGUF is Q4_1: its dequantized weights lie on such a grid, and come back as they were.
    gen = torch.Generator().manual_seed(5)
    scale = torch.rand(30, 4, 1, generator=gen) + 0.1
    low = torch.randn(30, 4, 1, generator=gen)
    q = torch.randint(0, 16, (30, 4, 32), generator=gen)
    q[..., 0], q[..., 1] = 0, 15  # every group spans its whole range
    weight = (q * scale + low).view(30, 128)
    _, scales, mins = weights.quantize_rows4(weight)
    assert torch.allclose(scales, scale.view(30, 4), rtol=1e-5) and torch.allclose(
        mins, low.view(30, 4), atol=1e-6
    )
    layer = nn.Linear(128, 30, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    assert torch.allclose(weights.QuantLinear(layer, 4).dequantized(torch.float32), weight, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 8, 12, 33, 40])
def test_the_quantized_ops_match_a_float64_product_of_the_dequantized_weight(bits: int, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows + bits)
    layer = nn.Linear(128, 70)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(70, 128, generator=gen))
    quant = weights.QuantLinear(layer, bits)
    x = torch.randn(rows, 128, generator=gen)
    want = x.double() @ quant.dequantized(torch.float64).T + layer.bias.double()
    got = quant(x)  # rows > MAX_ROWS: F.linear over the dequantized weight
    assert (got.double() - want).abs().max().item() < 1e-4


@needs_kernel
def test_the_quantized_ops_refuse_bad_tables() -> None:
    op8, op4 = weights.quantized_op(8), weights.quantized_op(4)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="scales must be"):
        op8(x, torch.zeros(5, 64, dtype=torch.int8), torch.ones(5, 3), None)
    with pytest.raises(RuntimeError, match="disagree on K"):
        op4(x, torch.zeros(5, 64, dtype=torch.uint8), torch.ones(5, 2), torch.zeros(5, 2), None)
    with pytest.raises(RuntimeError, match="mins must be"):
        op4(x, torch.zeros(5, 32, dtype=torch.uint8), torch.ones(5, 2), torch.zeros(5, 1), None)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_weights_replaces_linears_and_the_model_still_agrees(bits: int) -> None:
    model = tiny_model("llama")
    tokens = torch.tensor([[3, 7, 11, 2, 9, 4]])
    with torch.inference_mode():
        before = model.hf_model(input_ids=tokens).logits
    replaced = weights.quantize_weights(model.hf_model, bits)
    kinds = {type(m) for m in model.hf_model.modules()}
    assert replaced > 0 and nn.Linear not in kinds and weights.QuantLinear in kinds
    assert model.hf_model.lm_head.bits == 8  # the output projection never goes below 8 bits
    assert model.hf_model.model.layers[0].mlp.down_proj.bits == bits
    with torch.inference_mode():
        after = model.hf_model(input_ids=tokens).logits
    # groups of 32 move logits a little, not a lot (4 bits more than 8)
    assert (after - before).norm() / before.norm() < (0.05 if bits == 8 else 0.3)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_engine_decodes_as_transformers_does_with_the_same_layers(bits: int) -> None:
    model = tiny_model("llama", seed=2)
    weights.quantize_weights(model.hf_model, bits)
    model.weights = f"int{bits}"
    prompts = [random_prompt(n, 40 + n) for n in (3, 17, 64)]
    engine = Engine(model, CacheConfig(block_size=16, max_kv_bytes=16 * 2**20))
    outputs = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.output_ids == hf_greedy(model, prompt, 12), f"prompt len {len(prompt)}"


def test_bad_weights_are_refused_by_name() -> None:
    with pytest.raises(InvalidRequestError, match="weights must be one of model, int8, int4"):
        ModelConfig(weights="int2")
    with pytest.raises(InvalidRequestError, match="weights must be one of"):
        load("smollm2-135m", weights="fp8", device="cpu")
