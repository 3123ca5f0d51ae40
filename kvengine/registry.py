"""A registry of pluggable classes by name: presses, eviction policies.

It is a dict (name -> class) that adds a registering decorator and a lookup
whose error lists the known names, so that CLI, server and benchmarks give
the same message for an unknown name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from kvengine.errors import InvalidRequestError

T = TypeVar("T")
C = TypeVar("C", bound=type)


class Registry(dict[str, type[T]]):
    """Classes of one kind by name, in registration order."""

    def __init__(self, kind: str, plural: str, sort_names: bool = False) -> None:
        super().__init__()
        self.kind = kind  # e.g. "press": used in error messages
        self.plural = plural
        self.sort_names = sort_names

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator: file the class under `name` (once)."""

        def add(cls: C) -> C:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self[name] = cls
            return cls

        return add

    def lookup(self, name: str) -> type[T]:
        """The class filed under `name`; InvalidRequestError naming the known ones otherwise."""
        cls = self.get(name)
        if cls is None:
            names = sorted(self) if self.sort_names else list(self)
            raise InvalidRequestError(
                f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(names)}"
            )
        return cls
