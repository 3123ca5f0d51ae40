"""Compression methods that are not per-layer presses, registered by name next to the presses.

A press (`kvengine.press.base`) keeps tokens layer by layer under a budget
each layer states. Two methods do not fit that contract and live in this
second registry, which `kvengine presses`, `kvengine eval` and the
benchmarks read together with the presses:

- "quest" (`quest.py`): evicts nothing; each decode step reads only some
  blocks. The engine takes it (`ModelRunner.select_blocks`).
- "duo" (`duo.py`): retrieval heads keep everything, streaming heads keep
  sinks and a recent window; budgets differ per layer and head, from a
  per-model head map. It is a `Press` once bound to a model (`for_model`).

Methods are dataclasses with a `ratio` field and their hyperparameters,
built from (name, ratio, kwargs) as presses are; unknown names fail listing
the presses and the methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvengine.errors import InvalidRequestError
from kvengine.registry import Registry

METHODS: Registry[Any] = Registry("compression method", "compression methods", sort_names=True)
register_method = METHODS.register


def make_method(name: str, ratio: float, **kwargs: Any) -> Any:
    """The method registered as `name` at `ratio`, built with `kwargs` (its dataclass fields)."""
    cls = METHODS.lookup(name)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise InvalidRequestError(
            f"method {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; it has: {', '.join(fields)}"
        )
    try:
        return cls(ratio=ratio, **kwargs)
    except TypeError as exc:
        raise InvalidRequestError(f"bad arguments for method {name!r}: {exc}") from None


def method_or_press(spec: str, ratio: float, **kwargs: Any) -> Any:
    """A method by name, else a press from its spec; an unknown name lists both kinds."""
    from kvengine.press.registry import PRESSES, press_from_spec

    if spec in METHODS:
        return make_method(spec, ratio, **kwargs)
    if spec.split(":")[-1].strip() not in PRESSES:
        raise InvalidRequestError(
            f"unknown press {spec!r} (nor method); known presses: {', '.join(sorted(PRESSES))}; "
            f"known methods: {', '.join(sorted(METHODS))}"
        )
    return press_from_spec(spec, ratio, **kwargs)


def is_selection(spec: str) -> bool:
    """Whether `spec` names a decoding-time selection method (the engine takes it, not a cache)."""
    return spec in METHODS and hasattr(METHODS[spec], "selection")


def bound_press(spec: str, ratio: float, model: Any, **kwargs: Any) -> Any:
    """The press that compresses for `spec` at `ratio` on `model`: a press, or a method bound to the model."""
    press = method_or_press(spec, ratio, **kwargs)
    if is_selection(spec):
        raise InvalidRequestError(f"{spec!r} selects blocks while decoding; it compresses no cache")
    if getattr(press, "head_scores", False) is None:  # a method that needs the model's head map
        return press.for_model(model)
    return press
