"""kvpress's class names for the presses kvengine has, so that kvpress code ports as is.

    from kvengine.compat import SnapKVPress, AdaKVPress
    press = AdaKVPress(SnapKVPress(compression_ratio=0.5))

Every kvengine press takes kvpress's argument names (`compression_ratio`,
`compression_ratios`) besides its own (press/registry.py). Where kvpress and
kvengine name a class alike it is the same class; `AdaKVPress` and
`PerLayerCompressionPress` are kvengine's `AdaKV` and `PerLayerPress` under
kvpress's names. Only kvpress's methods that kvengine has are here, and all
but `RandomPress` keep exactly the tokens kvpress's keep (checked against a
kvpress fixture by tests/test_kvpress_reference.py and, through
`KVEngineCache`, tests/test_hf_cache_kvpress.py); `RandomPress` draws its own
random subsets. kvengine's `h2o` differs from kvpress's ObservedAttentionPress,
so it has no kvpress name. kvpress's `with press(model):` hooks are not here:
a kvengine press runs in a `KVEngineCache` (hf_cache.py) or in the engine.
"""

from __future__ import annotations

from kvengine.press.adakv import AdaKV
from kvengine.press.expected_attention import ExpectedAttentionPress
from kvengine.press.keydiff import KeyDiffPress
from kvengine.press.knorm import KnormPress
from kvengine.press.per_layer import PerLayerPress
from kvengine.press.pyramidkv import PyramidKVPress
from kvengine.press.random import RandomPress
from kvengine.press.snapkv import SnapKVPress
from kvengine.press.streaming_llm import StreamingLLMPress
from kvengine.press.tova import TOVAPress

AdaKVPress = AdaKV
PerLayerCompressionPress = PerLayerPress

#: kvpress class name -> kvengine's registered press name.
KVPRESS_CLASSES: dict[str, str] = {
    "AdaKVPress": "adakv",
    "ExpectedAttentionPress": "expected_attention",
    "KeyDiffPress": "keydiff",
    "KnormPress": "knorm",
    "PerLayerCompressionPress": "per_layer",
    "PyramidKVPress": "pyramidkv",
    "RandomPress": "random",
    "SnapKVPress": "snapkv",
    "StreamingLLMPress": "streaming_llm",
    "TOVAPress": "tova",
}

__all__ = [
    "KVPRESS_CLASSES",
    "AdaKVPress",
    "ExpectedAttentionPress",
    "KeyDiffPress",
    "KnormPress",
    "PerLayerCompressionPress",
    "PyramidKVPress",
    "RandomPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "TOVAPress",
]
