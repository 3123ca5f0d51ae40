"""kvengine's presses against kvpress 0.5.5: the same tokens kept per (layer, kv-head).

The reference is a fixture produced by the real kvpress (see
tools/kvpress_reference/): a tiny random Llama model saved with
`save_pretrained`, 256 distinct random token ids, and for each press setting
and ratio the token indices every (layer, kv-head) kept when kvpress
compressed the whole input as the context. kvpress is not needed here.

kvengine runs its real path on the same model and ids: `Engine.add_context`
with the press, one prefill step, compression by the runner, kept tokens
moved into fresh blocks by the paged cache. Which tokens each cell kept is
read back from the cache itself: every cached key is matched to the
bit-identical key of the same context cached without a press (the prefill is
the same computation either way).

Every case must match exactly, including where kvengine computes differently
by design (the press docstrings list the differences):
- snapkv, pyramidkv, tova: kvengine scores the queries its attention already
  computed, kvpress projects hidden states again; on this fixture the scores
  are equal or differ by float rounding.
- expected_attention: the query statistics come from the engine's queries
  un-rotated from RoPE instead of `q_proj` of the hidden states, and the
  softmax scale is the model's instead of `1/sqrt(d)` (equal for Llama); the
  scores differ by float rounding (measured: <= ~1e-7 of the largest score).
- pyramidkv and per_layer budgets: kvengine's extra floors (a 1-layer model,
  a budget below 1) do not act here, so the rounding is kvpress's.
- adakv: kvengine reserves `int(alpha * budget)` tokens per head where
  kvpress reserves at least 1; equal whenever `alpha * budget >= 1`, as in
  every case here (one case, alpha 0.9, makes the reservation change the
  result).
Rounding cannot flip a selection here: kvpress's kept and evicted scores are
at least `min_score_gap` apart relative to their size (>= 1.6e-5, some 100
float32 ulps), checked by `test_reference_does_not_hinge_on_ties`.

Not compared: `random` (kvengine mixes the layer into the seed and draws with
its own generator, so the libraries draw different subsets by design), `h2o`
(kvpress has no H2O press; its ObservedAttentionPress divides by the number
of queries that saw a token and needs eager attention), `scissorhands` (not in
kvpress) and `none` (nothing to compare).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.models import LoadedModel
from kvengine.press import PRESSES, Press, make_press

FIXTURE = Path(__file__).parent / "data" / "kvpress_reference"
CACHE = CacheConfig(block_size=8, max_kv_bytes=16 * 2**20)
# Registered presses with no kvpress counterpart to compare with (reasons in the module docstring).
NOT_COMPARED = {"random", "h2o", "scissorhands", "none", "demote"}
# kvpress's names of wrapper hyperparameters that kvengine spells differently.
RENAMED = {"compression_ratios": "ratios"}


@cache
def reference() -> dict[str, Any]:
    return json.loads((FIXTURE / "kept.json").read_text())


def case_ids() -> list[str]:
    return [f"{case['id']}-{case['ratio']}" for case in reference()["cases"]]


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    hf = AutoModelForCausalLM.from_pretrained(FIXTURE, local_files_only=True, dtype=torch.float32)
    return LoadedModel.from_hf(hf, name="kvpress-reference-tiny")


def build(case: dict[str, Any]) -> Press:
    """kvengine's press for a fixture case: same spec, ratio and hyperparameters as kvpress's."""
    *wrappers, name = case["spec"].split(":")
    press = make_press(name, ratio=case["ratio"], **case["kwargs"])
    for wrapper in wrappers:
        kwargs = {RENAMED.get(k, k): v for k, v in case["wrapper_kwargs"].items()}
        press = make_press(wrapper, press=press, **kwargs)
    return press


def cached_keys(model: LoadedModel, press: Press | None) -> list[list[torch.Tensor]]:
    """Keys `(n, D)` each (layer, kv-head) of the fixture's context holds after `add_context`."""
    engine = Engine(model, CACHE)
    ctx = engine.add_context(reference()["input_ids"], press)
    while engine.has_unfinished():
        engine.step()
    kv = engine.sequences[ctx].kv
    assert kv is not None
    keys = []
    for layer in range(model.num_layers):
        row = []
        for head in range(model.num_kv_heads):
            slots = kv.slots[layer, head, : int(kv.lens[layer, head])]
            row.append(engine.pool.read(slots)[0])
        keys.append(row)
    return keys


@pytest.fixture(scope="module")
def full_keys(model: LoadedModel) -> list[list[torch.Tensor]]:
    return cached_keys(model, None)


def token_indices(kept: torch.Tensor, full: torch.Tensor) -> list[int]:
    """Sorted indices into `full` `(T, D)` of the rows of `kept` `(n, D)`, each an exact copy."""
    equal = (kept[:, None, :] == full[None, :, :]).all(dim=-1)  # (n, T)
    assert bool((equal.sum(dim=1) == 1).all()), "a cached key matches no uncompressed key (or several)"
    return sorted(equal.float().argmax(dim=1).tolist())


def test_every_registered_press_is_compared_or_excused() -> None:
    """A new press must get a kvpress reference case, or a reason in NOT_COMPARED."""
    compared = {name for case in reference()["cases"] for name in case["spec"].split(":")}
    assert compared | NOT_COMPARED >= set(PRESSES), sorted(set(PRESSES) - compared - NOT_COMPARED)
    assert compared <= set(PRESSES)


def test_uncompressed_keys_are_distinct(full_keys: list[list[torch.Tensor]]) -> None:
    """Matching keys back to tokens is exact only if no two tokens of a cell share a key."""
    for row in full_keys:
        for keys in row:
            assert torch.unique(keys, dim=0).shape[0] == keys.shape[0]


def test_reference_does_not_hinge_on_ties() -> None:
    """kvpress's kept and evicted scores are far apart, so float rounding in either library cannot
    swap them; below ~1e-6 a case would test rounding, not the press."""
    gaps = {f"{case['id']}-{case['ratio']}": case["min_score_gap"] for case in reference()["cases"]}
    assert min(gaps.values()) > 1e-5, sorted(gaps.items(), key=lambda item: item[1])[:3]


@pytest.mark.parametrize("case", reference()["cases"], ids=case_ids())
def test_kept_tokens_match_kvpress(
    model: LoadedModel, full_keys: list[list[torch.Tensor]], case: dict[str, Any]
) -> None:
    keys = cached_keys(model, build(case))
    for layer, (row, full_row) in enumerate(zip(keys, full_keys, strict=True)):
        for head, (kept, full) in enumerate(zip(row, full_row, strict=True)):
            expected = case["kept"][layer][head]
            got = token_indices(kept, full)
            assert got == expected, (
                f"layer {layer} head {head}: kvengine keeps {len(got)} tokens, kvpress {len(expected)}; "
                f"only kvengine: {sorted(set(got) - set(expected))}, only kvpress: {sorted(set(expected) - set(got))}"
            )
