"""Presses by name: the one registry the Python API, CLI, server and benchmarks share."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from kvengine.errors import InvalidRequestError
from kvengine.press.base import Press
from kvengine.registry import Registry

P = TypeVar("P", bound=type)

PRESSES: Registry[Press] = Registry("press", "presses", sort_names=True)

# kvpress's argument names for the same hyperparameters, so that kvpress code ports as is
# (`SnapKVPress(compression_ratio=0.5)`); kvengine's own names stay the documented ones.
KVPRESS_NAMES = {"compression_ratio": "ratio", "compression_ratios": "ratios"}


def register_press(name: str) -> Callable[[P], P]:
    """Register a press class under `name`; its constructor also takes kvpress's argument names."""

    def decorate(cls: P) -> P:
        _accept_kvpress_names(cls)
        return PRESSES.register(name)(cls)

    return decorate


def _accept_kvpress_names(cls: type) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    aliases = {old: new for old, new in KVPRESS_NAMES.items() if new in fields}
    if not aliases:
        return
    init = cls.__init__  # type: ignore[misc]

    @functools.wraps(init)
    def __init__(self: object, *args: Any, **kwargs: Any) -> None:
        for old, new in aliases.items():
            if old in kwargs:
                if new in kwargs:
                    raise InvalidRequestError(
                        f"{cls.__name__}: give {new} or {old} (kvpress's name), not both"
                    )
                kwargs[new] = kwargs.pop(old)
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]


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
