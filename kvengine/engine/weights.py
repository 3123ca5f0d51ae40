"""Weight-only int8 and int4 linear layers (opt-in: `ModelConfig.weights`, `--weights`).

`quantize_weights(model, bits)` replaces every plain linear layer whose input
width is a multiple of 32 by a `QuantLinear`, in groups of 32 inputs:

- 8 bits: symmetric int8 with one float32 scale per group (the layout of
  llama.cpp's Q8_0): a quarter of float32's bytes;
- 4 bits: values 0..15 with a float32 scale and minimum per group (llama.cpp's
  Q4_1), two to a byte: an eighth of float32's bytes plus the group table.
  The bundled GGUF's layers are Q4_1, so they come back exactly as shipped.
  The lm_head keeps 8 bits (`quantize_weights`).

A few rows (decode) go through the kernels `kvengine::small_linear_q8` /
`small_linear_q4` (`small_linear.cpp`); more rows (prefill) multiply by the
weight dequantized for that call. Without the kernel every call dequantizes.
Embeddings stay as they are, so a tied lm_head is untied.

This module does not choose dtypes or devices: layers stay where their
weights were.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvengine.engine import linear
from kvengine.engine.kernel import load_op

GROUP = 32  # inputs per scale (and minimum)
BITS = (8, 4)


@cache
def quantized_op(bits: int) -> Any:
    """The `kvengine::small_linear_q8` / `_q4` op (the library of `small_linear`), or None."""
    return load_op(
        linear._SOURCE, "kvengine", f"small_linear_q{bits}", f"int{bits} linear (layers dequantize per call)"
    )


def _groups(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"quantized weights need an input width that is a multiple of {GROUP}, got {k}")
    return weight.detach().float().reshape(n, k // GROUP, GROUP)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of `weight` (N, K) in groups of 32 along K: (int8 (N, K), float32 scales (N, K / 32)).

    Each group's scale is its largest magnitude over 127, so a weight is off
    by at most half a scale. K must be a multiple of 32 (ValueError).
    """
    groups = _groups(weight)
    scales = groups.abs().amax(-1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(groups / scales[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(weight.shape).contiguous(), scales.contiguous()


def quantize_rows4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit of `weight` (N, K) in groups of 32: (uint8 (N, K / 2), scales (N, K / 32), mins (N, K / 32)).

    A group's values map to 0..15 between its minimum and maximum, so a
    weight is off by at most half a scale. In each group's 16 bytes, byte j
    holds value j in its low nibble and value j + 16 in its high one.
    """
    groups = _groups(weight)
    mins = groups.amin(-1)
    scales = (groups.amax(-1) - mins) / 15.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((groups - mins[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    n, k = weight.shape
    return packed.reshape(n, k // 2).contiguous(), scales.contiguous(), mins.contiguous()


class QuantLinear(nn.Module):
    """A linear layer with int8 or int4 weights in groups of 32, its bias kept as it was."""

    def __init__(self, layer: nn.Linear, bits: int) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        self.bits = bits
        self.in_features, self.out_features = layer.in_features, layer.out_features
        # Plain tensors, not parameters: a fixed layer, never trained.
        self.mins: torch.Tensor | None = None
        if bits == 8:
            self.qweight, self.scales = quantize_rows(layer.weight)
        else:
            self.qweight, self.scales, self.mins = quantize_rows4(layer.weight)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the stored values stand for, (N, K) in `dtype`."""
        n = self.out_features
        if self.mins is None:
            values = self.qweight.view(n, -1, GROUP).float() * self.scales[..., None]
        else:
            packed = self.qweight.view(n, -1, GROUP // 2)
            q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
            values = q * self.scales[..., None] + self.mins[..., None]
        return values.reshape(n, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if x.numel() else 0
        if 0 < rows <= linear.MAX_ROWS and x.device.type == "cpu":
            op = quantized_op(self.bits)
            if op is not None:
                flat = x.reshape(rows, self.in_features)
                tables = (self.scales,) if self.mins is None else (self.scales, self.mins)
                out: torch.Tensor = op(flat, self.qweight, *tables, self.bias)
                return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} groups of {GROUP}"


def quantize_weights(model: nn.Module, bits: int) -> int:
    """Replace each plain linear layer of `model` whose input width is a multiple of 32 by a `QuantLinear`.

    In place; returns how many were replaced. The output projection (the
    model's `get_output_embeddings()`, the lm_head) gets at least 8 bits, as
    llama.cpp keeps its output weight above 4 bits: logits are where a
    4-bit error shows most.
    """
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            plain = type(child) in (nn.Linear, linear.SmallBatchLinear)
            if isinstance(child, nn.Linear) and plain and child.in_features % GROUP == 0:
                setattr(parent, name, QuantLinear(child, max(bits, 8) if child is output else bits))
                replaced += 1
    return replaced
