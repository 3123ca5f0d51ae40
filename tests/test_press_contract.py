"""The press contract, for every press in the registry: a press registered today is tested today.

What `Press.keep` promises (base.py): per kv-head, sorted unique int64 indices into the layer's
tokens, as many as the press's budget, the same answer for the same input; ratio 0 keeps all.
Each press's own rule is checked against a naive reference in test_press_scores.py (presses
that need no attention weights, and the budget wrappers) and test_press_attention.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_press_scores import H_KV, NUM_LAYERS, as_lists, make_input

from kvengine.press import PRESSES, Press, make_press
from kvengine.press.adakv import AdaKV
from kvengine.press.base import num_kept
from kvengine.press.per_layer import PerLayerPress
from kvengine.press.pyramidkv import PyramidKVPress


def build(spec: str, ratio: float) -> Press:
    """The press `spec` names ("name" or "wrapper:inner") at `ratio`, from the registry's fields.

    A wrapper (a `press` field) wraps knorm unless `spec` names another inner press. Special
    cases: `ratios` (per_layer) gets uneven per-layer ratios, so that the layers differ; 'none'
    has ratio 0 only, so it is built without one (and keeps everything whatever `ratio` says).
    """
    name, _, inner = spec.partition(":")
    fields = {f.name for f in dataclasses.fields(PRESSES.lookup(name))}  # type: ignore[arg-type]
    kwargs: dict[str, object] = {}
    if "press" in fields:
        kwargs["press"] = build(inner or "knorm", ratio)
    if "ratios" in fields:
        kwargs["ratios"] = (ratio, ratio / 2, 0.0, ratio)[:NUM_LAYERS]
    elif "ratio" in fields and name != "none":
        kwargs["ratio"] = ratio
    return make_press(name, **kwargs)


# Every registered press, and the wrappers around a second score press (scores on another scale).
SPECS = [*sorted(PRESSES), "adakv:expected_attention", "per_layer:keydiff"]


def layer_budget(press: Press, num_tokens: int, layer: int, num_layers: int) -> int:
    """Tokens each kv-head of `layer` keeps (a head-wise press, AdaKV: its heads' mean).

    `num_kept` at the press's ratio, except where a press sets budgets per layer: PyramidKV's
    pyramid, PerLayer's ratios.
    """
    if isinstance(press, PyramidKVPress):
        return press.layer_budget(num_tokens, layer, num_layers)
    if isinstance(press, PerLayerPress):
        return num_kept(num_tokens, press.ratios[layer])
    return num_kept(num_tokens, press.ratio)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    ("num_tokens", "num_queries", "layer", "ratio"),
    [(96, None, 0, 0.6), (150, 12, 1, 0.6), (53, 53, 3, 0.6), (150, 37, 1, 0.3), (61, None, 1, 0.7)],
)
def test_keep_is_sorted_unique_in_range_of_budget_size(
    spec: str, num_tokens: int, num_queries: int | None, layer: int, ratio: float
) -> None:
    press = build(spec, ratio)
    inp = make_input(num_tokens, num_queries, layer=layer).inp
    kept = press.keep(inp)
    assert len(kept) == H_KV
    for idx in kept:
        assert idx.dtype == torch.int64 and idx.dim() == 1
        assert torch.equal(idx, idx.unique(sorted=True)), "sorted and unique"
        assert idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < num_tokens)
    budget = layer_budget(press, num_tokens, layer, NUM_LAYERS)
    if isinstance(press, AdaKV):  # head-wise budgets: only the layer's total is fixed
        assert sum(idx.numel() for idx in kept) == H_KV * budget
        assert min(idx.numel() for idx in kept) >= int(budget * press.alpha_safeguard)
    else:
        assert [idx.numel() for idx in kept] == [budget] * H_KV
    # The same input again (built afresh): the same answer.
    assert as_lists(press.keep(make_input(num_tokens, num_queries, layer=layer).inp)) == as_lists(kept)


@pytest.mark.parametrize("spec", SPECS)
def test_ratio_zero_keeps_everything(spec: str) -> None:
    inp = make_input(70, layer=1).inp
    assert as_lists(build(spec, 0.0).keep(inp)) == [list(range(70))] * H_KV
