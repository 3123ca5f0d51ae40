"""Errors kvengine raises for bad input or exhausted resources.

Every error a user can cause derives from `KVEngineError`, so the CLI and the
server can turn it into one clear line (exit code 2, or an HTTP 4xx) without
catching programming errors by accident.
"""

from __future__ import annotations


class KVEngineError(Exception):
    """Base class of every error caused by input or configuration, not by a bug."""


class InvalidRequestError(KVEngineError, ValueError):
    """A prompt or sampling parameter that cannot be served (empty, too long, out of range).

    `param` names the argument at fault where one is (e.g. "prompt"); the
    server reports it in its error body.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(KVEngineError, LookupError):
    """A model name that is not known, or whose package is not installed."""


class UnsupportedModelError(KVEngineError):
    """A model whose architecture family has no entry in the adapter table."""


class OutOfBlocksError(KVEngineError, MemoryError):
    """The block pool cannot hold what was asked of it."""


class MissingDependencyError(KVEngineError, ImportError):
    """An optional package a feature needs (e.g. redis for the redis tier) is not installed."""


class StepError(KVEngineError, RuntimeError):
    """A request ended by a failure while the engine ran it; the engine goes on with the others.

    Its step's forward pass raised, or the model's output for it was not
    finite (NaN or inf). The server answers it with a 500 (or an error event
    in a stream that has started).
    """
