"""Retrieval vs streaming heads (duo): which heads stream, what they keep, memory freed, the probe and its cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press import PressInput, head_probe
from kvengine.press.duo import DuoAttention
from kvengine.press.methods import bound_press, make_method

SCORES = ((0.9, 0.01), (0.02, 0.5), (0.03, 0.04))  # 3 layers x 2 kv-heads


def press_input(layer: int, num_tokens: int) -> PressInput:
    keys = torch.randn(2, num_tokens, 4)
    return PressInput(layer, 3, keys, keys.clone(), torch.randn(4, 8, 4), 0.5)


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.45, 0.6])
def test_the_lowest_scored_heads_stream_and_free_the_ratio(ratio: float) -> None:
    press = DuoAttention(ratio=ratio, n_sink=2, window=6, head_scores=SCORES)
    t = 100
    kept = [press.keep(press_input(layer, t)) for layer in range(3)]
    lens = torch.tensor([[idx.numel() for idx in layer] for layer in kept])
    streaming = lens < t
    # Brute force: the fewest lowest-scored heads whose streaming frees `ratio` of all tokens.
    order = sorted(range(6), key=lambda i: SCORES[i // 2][i % 2])
    need = next(n for n in range(7) if n * (t - 8) >= ratio * t * 6 - 1e-9)
    expected = torch.zeros(6, dtype=torch.bool)
    expected[order[:need]] = True
    assert torch.equal(streaming.flatten(), expected)
    assert 1 - lens.sum().item() / (6 * t) >= ratio
    for layer in range(3):
        for h, idx in enumerate(kept[layer]):
            if streaming[layer, h]:
                assert idx.tolist() == [0, 1, *range(t - 6, t)], "sinks and the recent window"
            else:
                assert idx.tolist() == list(range(t))


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(InvalidRequestError, match="head map"):
        DuoAttention(ratio=0.5).keep(press_input(0, 50))
    with pytest.raises(InvalidRequestError, match=r"out of reach at 50 tokens.*n_sink 4 \+ window 40"):
        DuoAttention(ratio=0.5, window=40, head_scores=SCORES).keep(press_input(0, 50))
    with pytest.raises(InvalidRequestError, match="2 layers, the model 3"):
        DuoAttention(ratio=0.5, head_scores=SCORES[:2]).keep(press_input(0, 500))
    with pytest.raises(InvalidRequestError, match="window must be an integer"):
        make_method("duo", 0.5, window=-1)
    with pytest.raises(InvalidRequestError, match="has no hyperparameter 'budget'"):
        make_method("duo", 0.5, budget=3)


def test_retrieval_mass_reads_the_echo_and_induction_keys() -> None:
    n = 6
    attn = torch.zeros(2, 2 * n, 2 * n, dtype=torch.float64)
    for t in range(1, n - 1):
        attn[0, n + t, t + 1] = 1.0  # head 0: a pure induction head
        attn[1, n + t, n + t] = 1.0  # head 1: attends to itself only
    assert head_probe._retrieval_mass(attn, n).tolist() == [1.0, 0.0]


def test_head_map_is_probed_once_then_read_from_the_cache(
    tiny_llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scores = head_probe.head_scores(tiny_llama, tmp_path)
    assert scores.shape == (tiny_llama.num_layers, tiny_llama.num_kv_heads)
    assert bool(((scores >= 0) & (scores <= 2)).all())
    path = head_probe.cache_path(tiny_llama, tmp_path)
    assert json.loads(path.read_text())["scores"] == scores.tolist()
    assert tiny_llama.hf_model.config._attn_implementation != "eager", "the probe restores the model"

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("probed again")

    monkeypatch.setattr(head_probe, "probe", fail)
    assert torch.equal(head_probe.head_scores(tiny_llama, tmp_path), scores)
    from conftest import tiny_model

    other = tiny_model("llama", seed=1)  # same name, other weights: another entry
    assert head_probe.cache_path(other, tmp_path) != path


def test_streaming_heads_free_their_blocks_in_the_engine(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    prompt = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(2)).tolist()
    engine = Engine(tiny_llama, CacheConfig(block_size=4, max_kv_bytes=2**22))
    base = engine.add_context(prompt, keep_queries=True)
    engine.run()
    scores = tuple(map(tuple, head_probe.head_scores(tiny_llama, tmp_path).tolist()))
    press = bound_press("duo", 0.5, tiny_llama, n_sink=4, window=12, head_scores=scores)
    assert isinstance(press, DuoAttention) and press.head_scores is not None
    copy = engine.compress_context(base, press)
    kv = engine.sequences[copy].kv
    assert kv is not None
    streaming = press.streaming_heads(160)
    assert torch.equal(kv.lens, torch.where(streaming, 16, 160))
    blocks = int((-(-kv.lens // 4)).sum())
    assert engine.cache.bytes_held(kv) == blocks * engine.pool.bytes_per_block
    assert engine.cache.bytes_held(kv) <= 0.5 * engine.cache.bytes_held(engine.sequences[base].kv)  # type: ignore[arg-type]
    seq = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), parent=copy)
    engine.run()
    assert len(engine.sequences[seq].output_ids) == 4


@pytest.mark.model
def test_the_bundled_model_has_a_few_strong_retrieval_heads(bundled: LoadedModel, tmp_path: Path) -> None:
    scores = head_probe.head_scores(bundled, tmp_path)
    assert scores.shape == (30, 3)
    strong = int((scores > 0.4).sum())
    assert 3 <= strong <= 20 and float(scores.median()) < 0.05
