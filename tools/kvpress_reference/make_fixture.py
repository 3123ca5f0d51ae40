"""Writes the kvpress reference fixture that tests/test_kvpress_reference.py checks kvengine against.

Runs in a separate venv with kvpress installed (see README.md next to this
file); imports only kvpress, transformers and torch, never kvengine. It
builds a tiny random Llama model from a fixed seed, saves it with
`save_pretrained`, prefills a fixed sequence of random token ids under each
kvpress press (the whole input is the context: query-agnostic compression),
and records which token indices every (layer, kv-head) kept.

How the kept indices are read, without touching kvpress's internals:
- presses that prune (all score presses): every key left in the cache is
  matched to the row of the uncompressed cache it is bit-identical to (the
  press's hook runs after the layer's attention, so a pruned prefill computes
  exactly the keys an unpruned one does);
- AdaKV, which masks instead of pruning: the kept set of a head is the
  complement of the `(batch, head, token)` indices it stores in
  `module.masked_key_indices` for the attention patch.

Usage: python make_fixture.py [OUT_DIR]   (default: tests/data/kvpress_reference)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import kvpress
import torch
import transformers
from kvpress.utils import extract_keys_and_values
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

SEED = 0
VOCAB_SIZE = 256
NUM_TOKENS = 256  # <= VOCAB_SIZE: the ids are distinct
RATIOS = (0.25, 0.5, 0.75)
# Random init at transformers' default std (0.02) makes attention nearly uniform, so
# attention-based scores differ by float noise; a larger std gives well-separated scores
# and a reference that does not hinge on rounding.
INIT_STD = 0.2
MODEL: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    initializer_range=INIT_STD,
    tie_word_embeddings=True,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "kvpress_reference"

# (case id, kvengine press spec, kvpress press class, inner press hyperparameters, wrapper
# hyperparameters), kvpress's defaults where not given. The names are the same in both
# libraries except kvpress's `compression_ratio` (kvengine's `ratio`) and per_layer's
# `compression_ratios` (kvengine's `ratios`). A spec "wrapper:inner" wraps the inner press
# in kvpress's AdaKVPress or PerLayerCompressionPress (kvengine's adakv and per_layer).
# Beyond the defaults: window 16 makes SnapKV's budget more than its observation window
# (the default window, 64, is a quarter of the context); window 4 with beta 5 gives
# PyramidKV budgets that depend on beta; alpha 0.9 makes AdaKV's safeguard bind (at the
# default 0.2 no head's own top tokens fall outside the layer's top-k on this fixture).
Case = tuple[str, str, type, dict[str, Any], dict[str, Any]]
CASES: tuple[Case, ...] = (
    ("knorm", "knorm", kvpress.KnormPress, {}, {}),
    ("keydiff", "keydiff", kvpress.KeyDiffPress, {}, {}),
    ("snapkv", "snapkv", kvpress.SnapKVPress, {}, {}),
    ("snapkv-w16", "snapkv", kvpress.SnapKVPress, {"window_size": 16}, {}),
    ("pyramidkv", "pyramidkv", kvpress.PyramidKVPress, {}, {}),
    ("pyramidkv-w16", "pyramidkv", kvpress.PyramidKVPress, {"window_size": 16}, {}),
    ("pyramidkv-w4-b5", "pyramidkv", kvpress.PyramidKVPress, {"window_size": 4, "beta": 5}, {}),
    ("tova", "tova", kvpress.TOVAPress, {}, {}),
    ("expected_attention", "expected_attention", kvpress.ExpectedAttentionPress, {}, {}),
    ("streaming_llm", "streaming_llm", kvpress.StreamingLLMPress, {}, {}),
    ("adakv-expected_attention", "adakv:expected_attention", kvpress.ExpectedAttentionPress, {}, {}),
    (
        "adakv-a0.9-expected_attention",
        "adakv:expected_attention",
        kvpress.ExpectedAttentionPress,
        {},
        {"alpha_safeguard": 0.9},
    ),
    ("adakv-snapkv-w16", "adakv:snapkv", kvpress.SnapKVPress, {"window_size": 16}, {}),
    ("adakv-knorm", "adakv:knorm", kvpress.KnormPress, {}, {}),
    ("per_layer-snapkv-w16", "per_layer:snapkv", kvpress.SnapKVPress, {"window_size": 16}, {}),
)
# per_layer's ratio per layer around the case's ratio (the mean stays the case's ratio).
PER_LAYER_OFFSETS = (-0.15, 0.0, 0.15)


def build_model(out_dir: Path) -> LlamaForCausalLM:
    """The tiny random model, saved to `out_dir` and loaded back from there (SDPA attention).

    SDPA, not eager: kvpress's AdaKV refuses eager attention.
    """
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).float()
    model.save_pretrained(out_dir, safe_serialization=True)
    loaded = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="sdpa")
    return loaded.eval().requires_grad_(False)


def prefill(model: LlamaForCausalLM, input_ids: torch.Tensor, press: object | None) -> DynamicCache:
    """The cache after one forward pass over `input_ids` `(1, T)`, under `press` if given."""
    cache = DynamicCache()
    with torch.inference_mode():
        if press is None:
            model(input_ids, past_key_values=cache, use_cache=True)
        else:
            with press(model):  # type: ignore[operator]
                model(input_ids, past_key_values=cache, use_cache=True)
    return cache


def match_rows(kept: torch.Tensor, full: torch.Tensor) -> list[int]:
    """Indices into `full` `(T, D)` of the rows of `kept` `(n, D)`, each an exact copy; sorted."""
    equal = (kept[:, None, :] == full[None, :, :]).all(dim=-1)  # (n, T)
    if not bool((equal.sum(dim=1) == 1).all()):
        raise AssertionError("a kept key is not an exact copy of exactly one uncompressed key")
    indices = sorted(equal.float().argmax(dim=1).tolist())
    if len(set(indices)) != len(indices):
        raise AssertionError("two kept keys match the same token")
    return indices


def kept_by_pruning(full: DynamicCache, pruned: DynamicCache) -> list[list[list[int]]]:
    """Kept indices `[layer][head]` of a cache a press pruned, matched against the full one."""
    out = []
    for layer in range(len(full.layers)):
        keys = extract_keys_and_values(full, layer)[0][0]  # (H_kv, T, D)
        kept = extract_keys_and_values(pruned, layer)[0][0]  # (H_kv, n, D)
        out.append([match_rows(kept[h], keys[h]) for h in range(keys.shape[0])])
    return out


def kept_by_masking(model: LlamaForCausalLM, num_tokens: int) -> list[list[list[int]]]:
    """Kept indices `[layer][head]` of a head-wise press: the complement of its masked keys."""
    out = []
    for layer in model.model.layers:
        attn = layer.self_attn
        num_heads = attn.config.num_key_value_heads
        keep = torch.ones(num_heads, num_tokens, dtype=torch.bool)  # (H_kv, T)
        masked = getattr(attn, "masked_key_indices", None)
        if masked is not None:
            batch, head, token = masked
            assert bool((batch == 0).all())
            keep[head, token] = False
        out.append([row.nonzero().squeeze(1).tolist() for row in keep])
        attn.masked_key_indices = None
    return out


def hyperparameters(press: object) -> dict[str, object]:
    """Every hyperparameter of a kvpress press except the ratio, by its field name."""
    fields = dataclasses.fields(press)  # type: ignore[arg-type]
    return {f.name: getattr(press, f.name) for f in fields if f.name not in ("compression_ratio", "press")}


def recording(press_cls: type) -> type:
    """`press_cls` whose `score()` also stores its result per layer in `self.scores`."""

    class Recording(press_cls):  # type: ignore[misc, valid-type]
        def score(self, module, *args, **kwargs):  # type: ignore[no-untyped-def]
            scores = super().score(module, *args, **kwargs)
            # A clone: AdaKV overwrites the scores in place with its safeguard.
            self.scores[module.layer_idx] = scores[0].detach().clone()  # (H_kv, T)
            return scores

    return Recording


def score_gap(scores: torch.Tensor, kept: list[list[int]], per_head: bool) -> float:
    """Smallest relative distance `|a - b| / max(|a|, |b|)` of a kept and an evicted score of a layer.

    `scores` `(H_kv, T)`; the comparison group is one head (per-head top-k) or
    the whole layer (AdaKV's top-k across heads). 0 means a tie decided which
    token stayed, so the reference would hinge on top-k tie-breaking; a value
    far above float32 rounding (~1e-7) means a reimplementation whose scores
    differ by rounding keeps the same tokens.
    """
    labels = torch.zeros_like(scores, dtype=torch.bool)
    for head, idx in enumerate(kept):
        labels[head, idx] = True
    groups = [(scores[h], labels[h]) for h in range(scores.shape[0])] if per_head else [(scores, labels)]
    gap = float("inf")
    for values, is_kept in groups:
        flat = values.flatten().double()
        order = flat.argsort()
        v, k = flat[order], is_kept.flatten()[order]
        cross = k[1:] != k[:-1]  # neighbours in score order, one kept and one evicted
        if bool(cross.any()):
            rel = (v[1:] - v[:-1]) / torch.maximum(v[1:].abs(), v[:-1].abs()).clamp_min(1e-30)
            gap = min(gap, float(rel[cross].min()))
    return gap


def wrap(
    spec: str, inner: object, ratio: float, kwargs: dict[str, object]
) -> tuple[object, dict[str, object]]:
    """The kvpress press for `spec` around `inner` (with `kwargs`), and all the wrapper's hyperparameters."""
    wrapper = spec.split(":")[0] if ":" in spec else None
    if wrapper is None:
        return inner, {}
    if wrapper == "adakv":
        ada = kvpress.AdaKVPress(inner, **kwargs)  # type: ignore[arg-type]
        return ada, {"alpha_safeguard": ada.alpha_safeguard}
    if wrapper == "per_layer":
        ratios = [round(ratio + d, 6) for d in PER_LAYER_OFFSETS]
        per_layer = kvpress.PerLayerCompressionPress(inner, ratios)  # type: ignore[arg-type]
        return per_layer, {"compression_ratios": ratios}
    raise ValueError(f"unknown wrapper in {spec!r}")


def run_case(
    model: LlamaForCausalLM, input_ids: torch.Tensor, full: DynamicCache, case: Case, ratio: float
) -> dict[str, object]:
    """One fixture entry: the press, its hyperparameters and what each (layer, head) kept."""
    case_id, spec, press_cls, kwargs, wrapper_kwargs = case
    inner = recording(press_cls)(compression_ratio=ratio, **kwargs)
    inner.scores = {}
    press, wrapper_kwargs = wrap(spec, inner, ratio, wrapper_kwargs)
    entry: dict[str, object] = {"id": case_id, "spec": spec, "ratio": ratio, "kwargs": hyperparameters(inner)}
    entry["wrapper_kwargs"] = wrapper_kwargs
    cache = prefill(model, input_ids, press)
    if isinstance(press, kvpress.AdaKVPress):
        if extract_keys_and_values(cache, 0)[0].shape[2] != input_ids.shape[1]:
            raise AssertionError("AdaKV is expected to mask, not prune")
        kept = kept_by_masking(model, input_ids.shape[1])
    else:
        kept = kept_by_pruning(full, cache)
    per_head = not isinstance(press, kvpress.AdaKVPress)
    gap = min(score_gap(inner.scores[layer], k, per_head) for layer, k in enumerate(kept))
    if gap == 0.0:
        raise AssertionError(f"{case_id} at ratio {ratio}: a score tie decides what is kept; change SEED")
    entry["min_score_gap"] = gap
    entry["kept"] = kept
    return entry


def main(out_dir: Path) -> None:
    transformers.utils.logging.disable_progress_bar()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(out_dir)
    generator = torch.Generator().manual_seed(SEED + 1)
    # Distinct ids: a repeated token has the same key norm at every position (RoPE keeps
    # norms), which would tie Knorm's scores in the first layer.
    input_ids = torch.randperm(VOCAB_SIZE, generator=generator)[:NUM_TOKENS][None]  # (1, T)
    full = prefill(model, input_ids, None)
    cases = [run_case(model, input_ids, full, case, r) for case in CASES for r in RATIOS]
    fixture = {
        "generated_by": "tools/kvpress_reference/make_fixture.py",
        "versions": {
            "kvpress": version("kvpress"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "attn_implementation": "sdpa",
        "input_ids": input_ids[0].tolist(),
        "cases": cases,
    }
    text = json.dumps(fixture, separators=(",", ":"))
    (out_dir / "kept.json").write_text(text + "\n")
    print(f"{len(cases)} cases, {len(text)} bytes of JSON -> {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
