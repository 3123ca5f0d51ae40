"""kvpress code ports as is: presses take kvpress's argument names for the same hyperparameters."""

from __future__ import annotations

import dataclasses

import pytest

from kvengine.errors import InvalidRequestError
from kvengine.press import PRESSES
from kvengine.press.per_layer import PerLayerPress
from kvengine.press.registry import KVPRESS_NAMES
from kvengine.press.snapkv import SnapKVPress

WITH_RATIO = [n for n in PRESSES if "ratio" in {f.name for f in dataclasses.fields(PRESSES.lookup(n))}]


@pytest.mark.parametrize("name", WITH_RATIO)
def test_compression_ratio_is_ratio(name: str) -> None:
    cls = PRESSES.lookup(name)
    ratio = 0.0 if name == "none" else 0.25  # the identity press only takes 0
    assert cls(compression_ratio=ratio) == cls(ratio=ratio)
    with pytest.raises(InvalidRequestError, match="not both"):
        cls(ratio=ratio, compression_ratio=ratio)
    with pytest.raises(InvalidRequestError, match="compression ratio must be in"):
        cls(compression_ratio=1.5)  # checked as kvengine's own name is


def test_per_layer_takes_compression_ratios() -> None:
    inner = SnapKVPress(window_size=4)
    assert PerLayerPress(inner, compression_ratios=[0.1, 0.5]) == PerLayerPress(inner, ratios=[0.1, 0.5])


def test_every_alias_names_a_field_of_some_press() -> None:
    fields = {f.name for n in PRESSES for f in dataclasses.fields(PRESSES.lookup(n))}
    assert set(KVPRESS_NAMES.values()) <= fields
    assert WITH_RATIO  # the registry has ratio presses at all
