"""Decode steps of Llama-family models in one C++ call (`fused_step.cpp`, CPU).

A decode step of a small model spends as long in transformers' modules
(hundreds of tiny operations, each paying Python and dispatch) as in reading
the weights. `FusedDecode` runs every decoder layer of a plain decode step in
the op `kvengine_fused::fused_decode`: the same arithmetic as the eager model
(RMSNorm, the projections, RoPE, attention over the pool in place, SiLU MLP,
residuals), rounded at the model's dtype where the eager model rounds, with the
linear layers and attention through kvengine's other kernels
(`small_linear.cpp`, `paged_decode.cpp`).

`fused_decode_for(model, pool)` says whether a model can take it: the
families whose decoder layer is exactly Llama's (llama, mistral, qwen2; qwen3
with its per-head q / k norms before RoPE), SiLU
MLPs, plain or `--weights int8|int4` linear layers, a CPU pool in the model's
dtype that keeps its blocks unpacked, and no sliding window. The runner uses
it only for steps where every sequence decodes one token with nothing to
record (no press, no block selection); every other step, and every model it
does not take, runs the model's own forward through kvengine's attention.
`KVENGINE_FUSED=off` turns it off alone, `KVENGINE_KERNEL=off` with the other
kernels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvengine.cache.paged import KVPool
from kvengine.engine import linear
from kvengine.engine.kernel import load_op, paged_decode
from kvengine.engine.linear import small_linear_op
from kvengine.engine.weights import QuantLinear
from kvengine.models import LoadedModel

log = logging.getLogger("kvengine.fused")

_SOURCE = Path(__file__).with_name("fused_step.cpp")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_PROJECTIONS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
)
_MLP = (("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
_KIND = {None: 0, 8: 1, 4: 2}


@cache
def fused_decode_op() -> Any:
    """The `kvengine_fused::fused_decode` op (after the ops it calls); None (logged once) without them."""
    if paged_decode() is None or small_linear_op() is None:
        return None
    return load_op(
        _SOURCE, "kvengine_fused", "fused_decode", "fused decode step (decode runs the model's modules)"
    )


@dataclass
class FusedDecode:
    """One model's arguments for `fused_decode`, gathered once; call it per decode step."""

    op: Callable[..., torch.Tensor]
    embed: nn.Module
    rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    norms: list[torch.Tensor]
    qk_norms: list[torch.Tensor]  # Qwen3's q_norm / k_norm per layer; empty for the others
    linears: list[torch.Tensor]
    kinds: list[int]
    num_heads: int
    num_kv_heads: int
    eps: float
    scale: float

    def __call__(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        pool: KVPool,
        new_slots: torch.Tensor,
        slots: torch.Tensor,
        lens: torch.Tensor,
    ) -> torch.Tensor:
        """The final norm's output `(N, E)` for N sequences decoding one token each.

        token_ids, positions `(N,)`; new_slots `(L, H_kv, N)`; slots
        `(L, N, H_kv, T)` and lens `(L, N, H_kv)` as in `DecodeBatch`. The new
        keys and values are written into `pool`.
        """
        hidden = self.embed(token_ids)
        cos, sin = self.rope(positions)
        return self.op(
            hidden, self.norms, self.qk_norms, self.linears, self.kinds, cos, sin, pool.k, pool.v,
            new_slots, slots, lens, self.num_heads, self.num_kv_heads, self.eps, self.scale, linear.MAX_ROWS,
        )  # fmt: skip


def fused_decode_for(model: LoadedModel, pool: KVPool, has_windows: bool) -> FusedDecode | None:
    """`model`'s fused decode step over `pool`, or None (with a debug line saying why) where it does not apply."""
    reason = _refusal(model, pool, has_windows)
    op = fused_decode_op() if reason is None else None
    if op is None:
        log.debug(
            "kvengine: decode steps run the model's modules (%s)", reason or "the kernel is unavailable"
        )
        return None
    hf = model.hf_model
    layers: list[Any] = list(model.adapter.layers(hf))
    base: Any = hf.model  # the decoder stack of a *ForCausalLM of these families
    norms = [
        t for layer in layers for t in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    ]
    norms.append(base.norm.weight)
    qk = [n for layer in layers for n in _qk_norms(layer, model.adapter.qk_norm)]
    linears: list[torch.Tensor] = []
    kinds: list[int] = []
    for layer in layers:
        for _, module in _linear_modules(layer):
            linears.extend(_linear_tensors(module))
            kinds.append(_KIND[module.bits if isinstance(module, QuantLinear) else None])
    config = hf.config
    return FusedDecode(
        op=op,
        embed=base.embed_tokens,
        rope=model.adapter.rope(hf, 0),
        norms=[n.detach() for n in norms],
        qk_norms=[n.weight.detach() for n in qk],
        linears=linears,
        kinds=kinds,
        num_heads=int(config.num_attention_heads),
        num_kv_heads=model.adapter.num_kv_heads(config),
        eps=float(layers[0].input_layernorm.variance_epsilon),
        scale=float(model.adapter.attention(hf, 0).scaling),  # type: ignore[arg-type]
    )


def _linear_modules(layer: Any) -> list[tuple[str, Any]]:
    """(path, module) of a decoder layer's seven linear layers in the op's order; None where one is missing."""
    return [(".".join(path), getattr(getattr(layer, path[0]), path[1], None)) for path in _PROJECTIONS + _MLP]


def _qk_norms(layer: Any, qk_norm: bool) -> tuple[Any, ...]:
    """A decoder layer's q_norm and k_norm (Qwen3), or nothing for a family without them."""
    return (layer.self_attn.q_norm, layer.self_attn.k_norm) if qk_norm else ()


def _stored_weight(module: Any) -> torch.Tensor:
    """The tensor a linear layer keeps its weight in: the packed values of a quantized one."""
    weight: torch.Tensor = module.qweight if isinstance(module, QuantLinear) else module.weight
    return weight


def _linear_tensors(module: Any) -> list[torch.Tensor]:
    """Weight, scales, mins, bias of one linear layer; an empty tensor where it has none."""
    none = torch.empty(0, device=_stored_weight(module).device)
    bias = module.bias.detach() if module.bias is not None else none
    if isinstance(module, QuantLinear):
        mins = module.mins if module.mins is not None else none
        return [module.qweight, module.scales, mins, bias]
    return [module.weight.detach(), none, none, bias]


def _refusal(model: LoadedModel, pool: KVPool, has_windows: bool) -> str | None:
    """Why `model` over `pool` cannot take the fused step, or None when it can."""
    hf = model.hf_model
    dtype = next(hf.parameters()).dtype
    if os.environ.get("KVENGINE_FUSED", "").lower() in ("0", "off", "false", "no"):
        return "KVENGINE_FUSED is off"
    if model.adapter.family not in FAMILIES:
        return f"family {model.adapter.family} is not one of {', '.join(FAMILIES)}"
    if has_windows:
        return "sliding-window layers"
    if pool.device.type != "cpu" or pool.seals_blocks or pool.dtype != dtype:
        return "the pool is not an unpacked CPU pool in the model's dtype"
    if getattr(hf.config, "hidden_act", None) != "silu":
        return f"activation {getattr(hf.config, 'hidden_act', None)!r} is not silu"
    layer: Any
    for layer in model.adapter.layers(hf):
        if type(layer).__name__ not in _LAYER_CLASSES:
            return f"decoder layer {type(layer).__name__} is not one of {', '.join(_LAYER_CLASSES)}"
        for path, module in _linear_modules(layer):
            if not isinstance(module, nn.Linear | QuantLinear):
                return f"{path} is not a linear layer"
            weight = _stored_weight(module)
            if not weight.is_contiguous() or weight.device.type != "cpu":
                return f"{path} has a non-contiguous or non-CPU weight"
            if not isinstance(module, QuantLinear) and weight.dtype != dtype:
                return f"{path} is not in the model's dtype"
        for norm in (
            layer.input_layernorm,
            layer.post_attention_layernorm,
            *_qk_norms(layer, model.adapter.qk_norm),
        ):
            if norm.weight.dtype != dtype or not hasattr(norm, "variance_epsilon"):
                return "a norm is not an RMSNorm in the model's dtype"
    return None
