"""Compression presses, one per file, registered by name (see base.py for the contract)."""

from kvengine.press import (
    adakv,  # noqa: F401  (registers)
    demote,  # noqa: F401  (registers)
    duo,  # noqa: F401  (registers a method)
    expected_attention,  # noqa: F401  (registers)
    h2o,  # noqa: F401  (registers)
    keydiff,  # noqa: F401  (registers)
    knorm,  # noqa: F401  (registers)
    none,  # noqa: F401  (registers)
    per_layer,  # noqa: F401  (registers)
    pyramidkv,  # noqa: F401  (registers)
    quest,  # noqa: F401  (registers a method)
    random,  # noqa: F401  (registers)
    scissorhands,  # noqa: F401  (registers)
    snapkv,  # noqa: F401  (registers)
    streaming_llm,  # noqa: F401  (registers)
    tova,  # noqa: F401  (registers)
)
from kvengine.press.base import Press, PressInput, ScorePress
from kvengine.press.registry import PRESSES, make_press, press_from_spec, register_press

__all__ = ["PRESSES", "Press", "PressInput", "ScorePress", "make_press", "press_from_spec", "register_press"]
