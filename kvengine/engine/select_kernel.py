"""The block selection kernel (`select_kernel.cpp`): built once per machine, loaded, or skipped.

Ranking a decode batch's blocks by their key bounds and writing the slot
table of the chosen ones is one pass of the torch op
`kvengine_select::select_blocks` (CPU only), instead of some fifteen small
torch ops per layer, each paying the intra-op thread pool's wake-up on a
busy machine. `kernel.load_op` builds it the way it builds the decode
attention kernel, as a separate library in its own directory, and
`KVENGINE_KERNEL=off` turns it off too.

Without it `kvengine.engine.selection` ranks with torch ops: the same
blocks (up to float rounding between near-equal bounds), slower. This
module only builds and loads; the contract is `selection.select_blocks`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from kvengine.engine.kernel import load_op

_SOURCE = Path(__file__).with_name("select_kernel.cpp")

SelectOp = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


@cache
def select_op() -> SelectOp | None:
    """The `kvengine_select::select_blocks` op, built on first call; None (logged once) where it cannot be had."""
    op: SelectOp | None = load_op(
        _SOURCE, "kvengine_select", "select_blocks", "block selection (selection runs as torch ops)"
    )
    return op
