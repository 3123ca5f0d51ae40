"""The identity press: keeps every token (the uncompressed baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvengine.errors import InvalidRequestError
from kvengine.press.base import Press, PressInput, check_ratio
from kvengine.press.registry import register_press


@register_press("none")
@dataclass
class NoPress(Press):
    """Keeps the whole cache; `ratio` must be 0. The baseline every press is compared with."""

    ratio: float = 0.0

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if self.ratio != 0.0:
            raise InvalidRequestError("the 'none' press keeps everything; its ratio must be 0")

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        return [torch.arange(inp.num_tokens, device=inp.keys.device) for _ in range(inp.num_kv_heads)]
