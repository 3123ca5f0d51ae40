"""A wrapped model keeps its own attention implementation for every forward pass not kvengine's.

kvengine's engine runs a Hugging Face model with the attention
implementation "kvengine" (engine/attention.py), which works only inside the
runner's forward context. The model is the user's object, though: after an
`Engine` was built on it, their own `hf_model.generate(...)` or
`hf_model(...)` must still run as before. `keep_own_attention(hf_model)`
(called by `LoadedModel.from_hf`) records the implementation the model has
and adds two hooks to its top module: a forward pre-hook that, when the
model is called with "kvengine" selected but outside kvengine's runner,
switches it back to its own implementation for that call, and a forward hook
(run even when the call raises) that switches "kvengine" in again.

It changes nothing for the runner's own forward passes, nor for a model that
never runs with "kvengine"; other implementations (such as a
`KVEngineCache`'s) pass through untouched. `use_attention(model, name)` is
the one way kvengine switches a model to another implementation for a block.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from transformers import PreTrainedModel

# The engine's attention implementation and the one a model falls back to if it had it already.
ENGINE_ATTENTION = "kvengine"
FALLBACK_ATTENTION = "sdpa"

# Models whose hooks are in place, and the implementation each had when it was wrapped.
_OWN: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def own_attention(hf_model: PreTrainedModel) -> str | None:
    """The implementation `hf_model` runs with outside kvengine's runner (None if not wrapped)."""
    return _OWN.get(hf_model)


def keep_own_attention(hf_model: PreTrainedModel) -> None:
    """Install the hooks once per model (see the module docstring)."""
    if hf_model in _OWN:
        return
    current = hf_model.config._attn_implementation
    _OWN[hf_model] = FALLBACK_ATTENTION if current in (None, ENGINE_ATTENTION) else str(current)
    switched: list[bool] = []  # one entry per call in flight: did its pre-hook switch?

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        model: PreTrainedModel = module  # type: ignore[assignment]  # the hooks sit on hf_model only
        switch = model.config._attn_implementation == ENGINE_ATTENTION and not _in_runner()
        if switch:
            model.set_attn_implementation(_OWN[model])
        switched.append(switch)

    def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if switched and switched.pop():
            model: PreTrainedModel = module  # type: ignore[assignment]
            model.set_attn_implementation(ENGINE_ATTENTION)

    hf_model.register_forward_pre_hook(before, with_kwargs=True)
    hf_model.register_forward_hook(after, with_kwargs=True, always_call=True)


def _in_runner() -> bool:
    """True inside the engine runner's forward context (its attention function works there)."""
    from kvengine.engine import attention  # the engine imports models; only this check looks back

    return attention._CURRENT.get() is not None


@contextmanager
def use_attention(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Run `model` with attention implementation `name` inside the block, then restore the one it had.

    Restored even when the block raises. For passes that need another
    implementation for a while (transformers' own SDPA in benchmarks, eager
    attention for its weights, a `KVEngineCache`, RAG's recompute).
    """
    saved = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(saved)
