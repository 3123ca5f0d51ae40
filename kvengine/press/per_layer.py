"""Per-layer ratios: a score press compressed at a different ratio in each layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from kvengine.errors import InvalidRequestError
from kvengine.press.base import Press, PressInput, ScorePress, check_ratio
from kvengine.press.registry import register_press


@register_press("per_layer")
@dataclass
class PerLayerPress(Press):
    """Keeps what the wrapped press keeps at ratio `ratios[layer]` in each layer.

    As kvpress's PerLayerCompressionPress, for hand-set or searched per-layer
    budgets (PyramidKV is one schedule of them). `ratios` needs one entry per
    model layer; the count is checked when the press first sees a layer, as
    the model is not known before. `ratio` is the mean of `ratios` (what the
    whole cache keeps when all layers hold the same number of tokens). The
    wrapped press is not changed: each layer runs a copy at its own ratio.
    """

    press: ScorePress
    ratios: tuple[float, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.press, ScorePress):
            raise InvalidRequestError(
                f"per_layer wraps a score press (one that implements score()), got {type(self.press).__name__}"
            )
        if isinstance(self.ratios, str | bytes) or not isinstance(self.ratios, Sequence) or not self.ratios:
            raise InvalidRequestError(
                f"per_layer: ratios must be a non-empty list of floats, got {self.ratios!r}"
            )
        self.ratios = tuple(self.ratios)  # hashable: part of prefix-cache keys
        for layer, ratio in enumerate(self.ratios):
            try:
                check_ratio(ratio)
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"per_layer: ratios[{layer}]: {exc}") from None

    @property
    def ratio(self) -> float:  # type: ignore[override]  # read-only: derived from `ratios`
        return sum(self.ratios) / len(self.ratios)

    @property
    def reserved_tokens(self) -> int:
        return self.press.reserved_tokens

    def validate(self, num_tokens: int, num_layers: int) -> None:
        if len(self.ratios) != num_layers:
            raise InvalidRequestError(
                f"per_layer: {len(self.ratios)} ratios given but the model has {num_layers} layers"
            )
        for ratio in self.ratios:
            replace(self.press, ratio=ratio).validate(num_tokens, num_layers)

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        if len(self.ratios) != inp.num_layers:
            self.validate(inp.num_tokens, inp.num_layers)
        return replace(self.press, ratio=self.ratios[inp.layer]).keep(inp)
