"""Presses by name: the one registry the Python API, CLI, server and benchmarks share."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvengine.errors import InvalidRequestError
from kvengine.press.base import Press
from kvengine.registry import Registry

PRESSES: Registry[Press] = Registry("press", "presses", sort_names=True)
register_press = PRESSES.register


def make_press(name: str, **kwargs: Any) -> Press:
    """The press registered as `name`, built with `kwargs` (its dataclass fields)."""
    cls = PRESSES.lookup(name)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise InvalidRequestError(
            f"press {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; it has: {', '.join(fields)}"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InvalidRequestError(f"bad arguments for press {name!r}: {exc}") from None


def press_from_spec(spec: str, ratio: float, **kwargs: Any) -> Press:
    """A press from a spec like "snapkv" or "adakv:expected_attention" (wrapper:inner).

    The innermost press gets `ratio` and `kwargs`; each wrapper wraps the next.
    """
    names = [n.strip() for n in spec.split(":")]
    if not all(names):
        raise InvalidRequestError(f"bad press spec {spec!r}: expected NAME or WRAPPER:NAME")
    press = make_press(names[-1], ratio=ratio, **kwargs)
    for wrapper in reversed(names[:-1]):
        press = make_press(wrapper, press=press)
    return press
