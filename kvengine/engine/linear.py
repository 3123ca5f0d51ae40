"""Linear layers for decode steps: a few rows through `kvengine::small_linear` (CPU).

A decode step multiplies each weight matrix by one row per sequence. At a
few rows that is bound by the weight's bytes, and PyTorch's general matmul
reads them well below the memory's speed on a CPU (the 113 MB lm_head of the
bundled model at ~6-9 GB/s of ~15 here). `small_linear.cpp` streams each
weight row once for all rows of the input.

`use_small_linear(model)` gives the model's `nn.Linear` modules a forward
that takes that path when kvengine's runner is driving the model (inside
`driving()`), the input has at most `MAX_ROWS` rows and everything is on the
CPU; otherwise, and in the model's own forward passes and `generate`, it is
`F.linear` as before. Results equal `F.linear`'s up to float32 summation
order. Without the kernel (no compiler, `KVENGINE_KERNEL=off`) nothing
changes.

Weight-only int8 / int4 layers, which use the same kernel library, are in
`weights.py`. This module does not choose dtypes or change weights.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvengine.engine.kernel import load_op

# Inputs with more rows than this go through F.linear. Measured on 2 AVX2 cores with the kernel on
# both threads (SmolLM2-135M's 210 decoder matrices, fp32): the kernel takes 0.50x ATen's time at
# 1 row, 0.60x at 16, 0.84x at 32 and 1.06x at 64 (docs/benchmarks.md).
MAX_ROWS = 32

_SOURCE = Path(__file__).with_name("small_linear.cpp")
_driving = threading.local()


@cache
def small_linear_op() -> Any:
    """The `kvengine::small_linear` op, built on first use; None (logged once) where it cannot be had."""
    return load_op(_SOURCE, "kvengine", "small_linear", "small-batch linear (decode uses F.linear)")


@contextmanager
def driving() -> Iterator[None]:
    """Within this block, on this thread, patched linear layers may take the small-batch kernel."""
    before = getattr(_driving, "on", False)
    _driving.on = True
    try:
        yield
    finally:
        _driving.on = before


class SmallBatchLinear(nn.Linear):
    """`nn.Linear` whose forward takes `kvengine::small_linear` for a few rows while kvengine drives."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if x.numel() else 0
        if 0 < rows <= MAX_ROWS and getattr(_driving, "on", False) and x.device.type == "cpu":
            op = small_linear_op()
            if op is not None:
                out: torch.Tensor = op(x.reshape(rows, self.in_features), self.weight, self.bias)
                return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_small_linear(model: nn.Module) -> int:
    """Give every plain `nn.Linear` of `model` the small-batch path, in place; how many were changed.

    Only modules whose class is exactly `nn.Linear` with contiguous CPU
    weights change (quantized or otherwise specialised linears are left as
    they are). Nothing happens when the kernel cannot be had.
    """
    if small_linear_op() is None:
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.is_contiguous():
            module.__class__ = SmallBatchLinear
            changed += 1
    return changed
