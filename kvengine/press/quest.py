"""`quest`: query-aware block selection while decoding, named among the compression methods.

Quest evicts nothing, so it is not a press (no `keep()`): the whole cache
stays and each decode step reads only some blocks
(`kvengine.engine.selection`). It is registered with the other methods
(`kvengine.press.methods`) so that one vocabulary names them all
(`kvengine presses`, `kvengine eval --presses quest --ratios 0.875`):
`ratio` is the fraction of a cell's blocks a step does *not* read, as a
press's ratio is the fraction it drops. The engine takes its `selection`
(`ModelRunner.select_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvengine.engine.selection import BlockSelection
from kvengine.press.base import check_ratio
from kvengine.press.methods import register_method


@register_method("quest")
@dataclass
class QuestSelection:
    """Reads the top blocks per head by key-bound score each decode step (Tang et al. 2024, arXiv:2406.10774).

    Each step reads `1 - ratio` of a cell's blocks (rounded up), among them
    `sink_blocks` first and `recent_blocks` last ones; the first
    `dense_layers` layers read all. `heads`: "sum" ranks blocks by the
    kv-head's query heads' bounds summed (Quest's), "max" by each query
    head's bound relative to its best block, the best head deciding, "mass"
    by each head's softmax over its blocks' bounds, summed over heads.
    `neighbours`: each sink and each block taken for its score brings that
    many following blocks, within the same budget. Bytes held: the whole
    cache plus per-block key bounds (1/block_size of it).
    """

    ratio: float = 0.0
    sink_blocks: int = 1
    recent_blocks: int = 2
    dense_layers: int = 0
    heads: str = "sum"
    neighbours: int = 0

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        self.selection  # noqa: B018 (validates the other fields, naming the bad one)

    @property
    def selection(self) -> BlockSelection:
        """What the runner's block selection takes."""
        return BlockSelection(
            fraction=1.0 - self.ratio,
            sink_blocks=self.sink_blocks,
            recent_blocks=self.recent_blocks,
            dense_layers=self.dense_layers,
            heads=self.heads,
            neighbours=self.neighbours,
        )
