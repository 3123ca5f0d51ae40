"""For code written against transformers and kvpress: kvengine's cache and presses under their habits.

`KVEngineCache` (hf_cache.py) runs a press and kvengine's paged pool inside a
user's own `model.generate(..., past_key_values=cache)`; the press classes
are importable under kvpress's names (kvpress.py).
"""

from kvengine.compat.hf_cache import KVEngineCache
from kvengine.compat.kvpress import (
    KVPRESS_CLASSES,
    AdaKVPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    PerLayerCompressionPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

__all__ = [
    "KVPRESS_CLASSES",
    "AdaKVPress",
    "ExpectedAttentionPress",
    "KVEngineCache",
    "KeyDiffPress",
    "KnormPress",
    "PerLayerCompressionPress",
    "PyramidKVPress",
    "RandomPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "TOVAPress",
]
