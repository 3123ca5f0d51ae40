"""Moving cached keys to a new position: RoPE is a rotation, so rotate by the position delta.

A key cached at position p holds `R(p) k`; the same token at position p + d
needs `R(p + d) k = R(d) R(p) k`, because the rotations of every channel pair
commute. This holds for plain RoPE and for position-independent frequency
changes (linear, llama3); it does not for rotary variants whose cos/sin carry
a scale or depend on the sequence length (yarn, dynamic NTK, longrope), for
partial rotary dimensions, nor for models with sliding-window layers (a
window changes which tokens a chunk saw). `check_rerotatable` refuses those
with UnsupportedModelError.

This module knows nothing about chunks or caches; it only rotates tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvengine.errors import UnsupportedModelError
from kvengine.models import LoadedModel

PURE_ROTATION_ROPE_TYPES = ("default", "linear", "llama3")

CosSin = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rope_type(model: LoadedModel) -> str:
    """The rotary variant of `model`'s config ("default" when none is named)."""
    config = model.config
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        types = {str(v.get("rope_type", "default")) for v in params.values() if isinstance(v, dict)}
        return types.pop() if len(types) == 1 else "per-layer:" + ",".join(sorted(types))
    found = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    return str(found)


def check_rerotatable(model: LoadedModel) -> None:
    """Raise UnsupportedModelError unless `model`'s cached keys move by a plain rotation."""
    name = f"{model.name} ({model.config.model_type})"
    kind = rope_type(model)
    if kind not in PURE_ROTATION_ROPE_TYPES:
        raise UnsupportedModelError(
            f"chunk reuse needs keys that move by a pure rotation; {name} uses rope_type {kind!r} "
            f"(supported: {', '.join(PURE_ROTATION_ROPE_TYPES)})"
        )
    windows = [i for i in range(model.num_layers) if model.sliding_window(i) is not None]
    if windows:
        raise UnsupportedModelError(
            f"chunk reuse does not support sliding-window layers; {name} has them in layers {windows[:8]}"
        )
    cos, sin = model.adapter.rope(model.hf_model)(torch.zeros(1, dtype=torch.long))
    if cos.shape[-1] != model.head_dim:
        raise UnsupportedModelError(
            f"chunk reuse needs rotary embeddings over the whole head; {name} rotates "
            f"{cos.shape[-1]} of {model.head_dim} channels"
        )
    if not (torch.allclose(cos.float(), torch.ones(1)) and torch.allclose(sin.float(), torch.zeros(1))):
        raise UnsupportedModelError(
            f"{name}'s rotary embedding scales keys (cos(0) != 1): not a pure rotation"
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' channel pairing: the first half of the channels against the second."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rerotate(keys: torch.Tensor, delta: int, cos_sin: CosSin) -> torch.Tensor:
    """`keys` `(..., T, D)` cached at positions p, as they are at positions p + `delta`.

    `cos_sin` is the model's rotary function (positions -> cos, sin), e.g.
    `model.adapter.rope(model.hf_model, layer)`. Computed in float32, returned
    in the keys' dtype.
    """
    if delta == 0:
        return keys
    cos, sin = cos_sin(torch.tensor([delta], dtype=torch.long, device=keys.device))
    return rotate(keys, cos[0], sin[0])


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`keys` `(..., D)` rotated by the angles whose `cos` and `sin` broadcast against them; float32 inside."""
    k = keys.float()
    return (k * cos.float() + rotate_half(k) * sin.float()).to(keys.dtype)
