"""Byte budgets against the 16-bit cache: what a method's ratio must be to hold a given fraction of it.

The issue's vocabulary is "bytes held as a fraction of the 16-bit cache of
the same tokens" (`kvengine eval --kv-budgets 0.25,0.125`). On a float32
pool the 16-bit cache is half the pool's uncompressed one; packed blocks
count their real bytes, scales and zero points included. This module turns
a budget into the ratio each kind of setting runs at:

- an evicting press (or `duo`) on the plain pool keeps `1 - ratio` of the
  tokens in the pool's dtype;
- the same on a packed pool (KIVI width b) keeps them packed, with one
  partly filled block per (layer, kv-head) left open in full precision (KIVI's
  residual), so fewer tokens are evicted for the same bytes;
- `demote:<press>` states its budget itself, in the pool's dtype
  (`DemotePress.budget_fraction`), and plans whole blocks exactly.

The ratios are planned for the requested context length, so they are known
before any example is built (they are part of a result row's key); the
bytes a run really holds are measured and reported, never these estimates.
Nothing here runs a model.
"""

from __future__ import annotations

from typing import Any

import torch

from kvengine.cache.quant import KIVILayout
from kvengine.config import CacheConfig
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press.demote import is_demote_spec

PACKED_BLOCK_SIZE = 32  # one key group per block, as in KIVI; the packed pools of `kvengine eval`
FP_BLOCK_SIZE = CacheConfig().block_size  # the plain pools of `kvengine eval`


def bytes_16bit(model: LoadedModel, num_tokens: int) -> int:
    """Bytes of the 16-bit cache of `num_tokens` tokens (keys and values, every layer and kv-head)."""
    return 2 * num_tokens * model.num_layers * model.num_kv_heads * model.head_dim * 2


def _itemsize(model: LoadedModel) -> int:
    return torch.empty((), dtype=model.dtype).element_size()


def storage_bytes_per_token(model: LoadedModel, bits: int, storage: dict[str, Any] | None = None) -> float:
    """Bytes one token takes in one (layer, kv-head) cell: full precision (bits 0) or packed at `bits`."""
    if not bits:
        return 2 * model.head_dim * _itemsize(model)
    layout = KIVILayout(PACKED_BLOCK_SIZE, model.head_dim, bits, **_layout_options(storage))
    return layout.packed_bytes / PACKED_BLOCK_SIZE


def _layout_options(storage: dict[str, Any] | None) -> dict[str, Any]:
    storage = storage or {}
    return {"key_groups": storage.get("kv_key_groups", "channel"), "rotate": storage.get("kv_rotate", False)}


def ratio_for_budget(
    spec: str,
    bits: int,
    budget: float,
    model: LoadedModel,
    num_tokens: int,
    storage: dict[str, Any] | None = None,
) -> float:
    """The ratio at which `spec` on storage `bits` holds at most `budget` of the 16-bit cache.

    0.0 when the storage alone fits (nothing needs evicting). Raises
    InvalidRequestError when the budget cannot hold even the full-precision
    block a cell keeps open. Rounded down to 4 decimals' worth of safety.
    """
    if not 0.0 < budget <= 1.0:
        raise InvalidRequestError(f"a byte budget is a fraction of the 16-bit cache in (0, 1], got {budget}")
    if num_tokens < 1:
        raise InvalidRequestError(f"a byte budget needs a context of >= 1 token, got {num_tokens}")
    per_token_16 = 4 * model.head_dim  # keys and values, 2 bytes each
    if is_demote_spec(spec):
        # Demote plans its own whole blocks in the pool's dtype: its budget is that fraction.
        ratio = 1.0 - budget * per_token_16 / storage_bytes_per_token(model, 0)
        return _checked(spec, budget, max(0.0, _round_up(ratio)))
    block = PACKED_BLOCK_SIZE if bits else FP_BLOCK_SIZE
    open_block = block * storage_bytes_per_token(model, 0)  # a cell's last, partly filled block
    allowed = budget * num_tokens * per_token_16 - open_block  # per cell, for the other blocks
    keep = allowed / (num_tokens * storage_bytes_per_token(model, bits, storage))
    return _checked(spec, budget, max(0.0, _round_up(1.0 - keep)))


def _round_up(ratio: float) -> float:
    return float(-(-round(ratio * 1e6) // 100) / 1e4)  # ceil to 4 decimals (of a value cleaned to 6)


def _checked(spec: str, budget: float, ratio: float) -> float:
    if ratio >= 1.0:
        raise InvalidRequestError(
            f"{spec}: a budget of {budget:g} of the 16-bit cache cannot hold even the block each "
            "(layer, kv-head) keeps open; raise the budget"
        )
    return ratio


def budget_settings(
    presses: tuple[str, ...],
    packed_presses: tuple[str, ...],
    kivi: tuple[int, ...],
    budgets: tuple[float, ...],
    model: LoadedModel,
    num_tokens: int,
    storage: dict[str, Any] | None = None,
) -> list[tuple[str, float, int]]:
    """(press, ratio, kivi) of every run under `budgets`, in run order (fp pool first, then each width).

    "none" runs once per storage; `presses` (not demote) on the plain pool at
    each budget; on each KIVI width the demote presses and `packed_presses`
    at each budget, a press whose storage alone fits the budget (ratio 0,
    the same as "none" there) left out.
    """
    demote = [s for s in presses if is_demote_spec(s)]
    out: list[tuple[str, float, int]] = []
    for spec in presses:
        if spec == "none":
            out.append(("none", 0.0, 0))
        elif not is_demote_spec(spec):
            out += [(spec, ratio_for_budget(spec, 0, b, model, num_tokens), 0) for b in budgets]
    for bits in kivi:
        out.append(("none", 0.0, bits))
        for spec in (*demote, *packed_presses):
            for b in budgets:
                ratio = ratio_for_budget(spec, bits, b, model, num_tokens, storage)
                if ratio > 0.0 or is_demote_spec(spec):
                    out.append((spec, ratio, bits))
    return list(dict.fromkeys(out))
