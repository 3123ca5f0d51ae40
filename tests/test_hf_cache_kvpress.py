"""kvpress code ports to `kvengine.compat`: kvpress's class names, and the tokens kvpress keeps.

The reference is the fixture made by the real kvpress 0.5.5
(tests/data/kvpress_reference, see tests/test_kvpress_reference.py): for each
press case, the token indices every (layer, kv-head) kept when kvpress
compressed the fixture's ids as a context. Here the same press, built from
kvpress's class names and argument names, runs inside transformers' own
`generate` through a `KVEngineCache`, and the cache's record of each kept
token's position must be kvpress's indices exactly.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

import kvengine.compat as compat
from kvengine.compat import KVPRESS_CLASSES, KVEngineCache
from kvengine.eval.kvpress_worker import PRESS_CLASSES, WRAPPER_CLASSES
from kvengine.press import PRESSES, Press

FIXTURE = Path(__file__).parent / "data" / "kvpress_reference"


@cache
def reference() -> dict[str, Any]:
    return json.loads((FIXTURE / "kept.json").read_text())


@pytest.fixture(scope="module")
def hf() -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(FIXTURE, local_files_only=True, dtype=torch.float32)


def kvpress_style(case: dict[str, Any]) -> Press:
    """The case's press written as kvpress code writes it: kvpress class names and argument names."""
    by_name = {name: cls for cls, name in KVPRESS_CLASSES.items()}
    *wrappers, name = case["spec"].split(":")
    press = getattr(compat, by_name[name])(compression_ratio=case["ratio"], **case["kwargs"])
    for wrapper in wrappers:
        press = getattr(compat, by_name[wrapper])(press, **case["wrapper_kwargs"])
    return press


def test_kvpress_names_are_the_registered_presses() -> None:
    for kvpress_name, name in KVPRESS_CLASSES.items():
        assert getattr(compat, kvpress_name) is PRESSES.lookup(name), kvpress_name
    # every press the kvpress baseline runs is importable under the name kvpress gives it
    for name, kvpress_name in {**PRESS_CLASSES, **WRAPPER_CLASSES}.items():
        assert KVPRESS_CLASSES.get(kvpress_name) == name, kvpress_name


def test_kvpress_argument_names() -> None:
    assert compat.SnapKVPress(compression_ratio=0.5) == compat.SnapKVPress(ratio=0.5)
    inner = compat.KnormPress(compression_ratio=0.3)
    assert compat.PerLayerCompressionPress(inner, compression_ratios=[0.1, 0.2]).ratios == (0.1, 0.2)
    assert compat.AdaKVPress(inner, alpha_safeguard=0.5).alpha_safeguard == 0.5


@pytest.mark.parametrize("case", reference()["cases"], ids=lambda c: f"{c['id']}-{c['ratio']}")
def test_generate_keeps_what_kvpress_keeps(hf: PreTrainedModel, case: dict[str, Any]) -> None:
    ids = torch.tensor([reference()["input_ids"]])
    with KVEngineCache(hf, kvpress_style(case)) as kv:
        hf.generate(ids, max_new_tokens=1, do_sample=False, past_key_values=kv)  # prefill and press only
        for layer, heads in enumerate(case["kept"]):
            positions = kv.token_positions(layer)
            for head, expected in enumerate(heads):
                got = positions[head, : int(kv.seq.lens[layer, head])].tolist()
                assert got == expected, (
                    f"layer {layer} head {head}: only kvengine {sorted(set(got) - set(expected))}, "
                    f"only kvpress {sorted(set(expected) - set(got))}"
                )
