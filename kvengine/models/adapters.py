"""The adapter table: what kvengine knows about each architecture family.

Everything kvengine needs to know about a family of decoder models (where the
decoder layers are, what the attention module and its projections are called,
which layers attend through a sliding window) is data in `ADAPTERS`, looked up
by the config's `model_type`. Nothing else in kvengine checks model classes;
supporting a new family means adding one row here.

This module knows nothing about loading weights or tokenizers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from kvengine.errors import UnsupportedModelError

# How a family decides which layers attend through a sliding window:
# "none": every layer attends to the whole context;
# "all_layers": `config.sliding_window` (may be None) applies to every layer;
# "layer_types": `config.layer_types[i] == "sliding_attention"` marks windowed layers.
WindowRule = Literal["none", "all_layers", "layer_types"]


@dataclass(frozen=True)
class ArchAdapter:
    """Where kvengine finds things in one architecture family.

    Attribute paths are relative to the `*ForCausalLM` model (`layers_path`) or
    to one decoder layer (`attn_name`) or to its attention module (projections).
    """

    family: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    attn_name: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    rotary_path: str = "model.rotary_emb"
    qk_norm: bool = False  # q_norm / k_norm per head, applied before RoPE
    window_rule: WindowRule = "none"
    # The rotary module takes the layer's type (Gemma3: other frequencies for sliding layers).
    rope_by_layer_type: bool = False

    def num_kv_heads(self, config: PretrainedConfig) -> int:
        """Key/value heads per layer; equals the query heads when the config has no GQA field."""
        num_kv_heads = getattr(config, "num_key_value_heads", None)
        return int(num_kv_heads or config.num_attention_heads)

    def head_dim(self, config: PretrainedConfig) -> int:
        """Channels per head: `config.head_dim`, else `hidden_size // num_attention_heads`."""
        head_dim = getattr(config, "head_dim", None)
        return int(head_dim or config.hidden_size // config.num_attention_heads)

    def sliding_window(self, config: PretrainedConfig, layer_idx: int) -> int | None:
        """Tokens layer `layer_idx` attends back to, or None for full attention.

        Raises IndexError when `layer_idx` is not a layer of `config`.
        """
        num_layers = config.num_hidden_layers
        if not 0 <= layer_idx < num_layers:
            raise IndexError(f"layer_idx {layer_idx} out of range for {num_layers} layers")
        window = getattr(config, "sliding_window", None)
        if self.window_rule == "none" or window is None:
            return None
        if self.window_rule == "layer_types":
            layer_types = getattr(config, "layer_types", None)
            if layer_types is None or layer_types[layer_idx] != "sliding_attention":
                return None
        return int(window)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a `*ForCausalLM` model of this family, in order."""
        layers: nn.ModuleList = attrgetter(self.layers_path)(model)
        return layers

    def rope(
        self, model: nn.Module, layer_idx: int = 0
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Layer `layer_idx`'s rotary embedding as a function: positions `(N,)` -> `(cos, sin)`, each `(N, D)`."""
        rotary: nn.Module = attrgetter(self.rotary_path)(model)
        dtype = next(model.parameters()).dtype
        extra = (attrgetter("config.layer_types")(model)[layer_idx],) if self.rope_by_layer_type else ()

        def cos_sin(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            probe = torch.empty(
                1, dtype=dtype, device=positions.device
            )  # the module reads only dtype and device
            cos, sin = rotary(probe, positions[None], *extra)
            return cos[0], sin[0]

        return cos_sin

    def attention(self, model: nn.Module, layer_idx: int) -> nn.Module:
        """The attention module of decoder layer `layer_idx`."""
        attn: nn.Module = getattr(self.layers(model)[layer_idx], self.attn_name)
        return attn


ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter(family="llama", model_types=("llama",)),
    ArchAdapter(family="mistral", model_types=("mistral",), window_rule="all_layers"),
    # Qwen2 derives layer_types from use_sliding_window and max_window_layers.
    ArchAdapter(family="qwen2", model_types=("qwen2",), window_rule="layer_types"),
    ArchAdapter(family="qwen3", model_types=("qwen3",), qk_norm=True, window_rule="layer_types"),
    ArchAdapter(
        family="gemma3",
        model_types=("gemma3_text",),
        qk_norm=True,
        window_rule="layer_types",
        rope_by_layer_type=True,
    ),
)


def supported_model_types() -> tuple[str, ...]:
    """Every `model_type` that has an adapter, in table order."""
    return tuple(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_for(config: PretrainedConfig) -> ArchAdapter:
    """The adapter whose `model_types` contains `config.model_type`.

    Raises UnsupportedModelError naming the model type and the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    families = ", ".join(f"{a.family} ({', '.join(a.model_types)})" for a in ADAPTERS)
    raise UnsupportedModelError(
        f"kvengine has no adapter for model_type {model_type!r}; supported families: {families}"
    )
