"""Presses that read attention weights (H2O, Scissorhands, SnapKV, PyramidKV, TOVA) vs naive references.

Each reference is the paper's (or kvpress's) rule written with loops over a
dense float64 causal softmax, on random GQA inputs (2 kv-heads, 4 query heads).
The contract every registered press keeps (sizes, order, ratio 0) is in test_press_contract.py.
"""

from __future__ import annotations

import pytest
import torch

from kvengine.errors import InvalidRequestError
from kvengine.press import PressInput, make_press
from kvengine.press.attention import accumulated_attention
from kvengine.press.pyramidkv import PyramidKVPress
from kvengine.press.snapkv import SnapKVPress

NUM_KV_HEADS, GROUP, HEAD_DIM = 2, 2, 16


def make_input(
    num_tokens: int = 120, num_queries: int | None = None, seed: int = 0, layer: int = 0, num_layers: int = 4
) -> PressInput:
    """Random keys/values/queries of one layer; the queries are those of the last `num_queries` tokens."""
    gen = torch.Generator().manual_seed(seed)
    num_queries = num_tokens if num_queries is None else num_queries
    keys = 2 * torch.randn(NUM_KV_HEADS, num_tokens, HEAD_DIM, generator=gen)
    values = torch.randn(NUM_KV_HEADS, num_tokens, HEAD_DIM, generator=gen)
    queries = torch.randn(NUM_KV_HEADS * GROUP, num_queries, HEAD_DIM, generator=gen)
    return PressInput(layer, num_layers, keys, values, queries, scaling=HEAD_DIM**-0.5)


def dense_attention(inp: PressInput) -> list[list[list[float]]]:
    """Causal softmax `[H_q][T_q][T]` in float64, every query over every token it sees."""
    num_tokens, num_queries = inp.num_tokens, inp.queries.shape[1]
    keys = inp.keys.double().repeat_interleave(GROUP, dim=0)
    scores = inp.queries.double() @ keys.transpose(1, 2) * inp.scaling
    q_pos = torch.arange(num_tokens - num_queries, num_tokens)
    future = torch.arange(num_tokens)[None, :] > q_pos[:, None]
    return scores.masked_fill(future, float("-inf")).softmax(-1).tolist()


def budget_of(num_tokens: int, ratio: float) -> int:
    return max(1, int(num_tokens * (1 - ratio)))


def top(values: list[float], candidates: range, n: int) -> set[int]:
    return set(sorted(candidates, key=lambda j: -values[j])[:n])


def group_mean(rows: list[list[float]], kv_head: int) -> list[float]:
    mine = rows[kv_head * GROUP : (kv_head + 1) * GROUP]
    return [sum(col) / GROUP for col in zip(*mine, strict=True)]


def h2o_reference(inp: PressInput, ratio: float, n_recent: int | None = None) -> list[set[int]]:
    """H2O: the recent window plus the heavy hitters of accumulated attention among older tokens."""
    att, num_tokens = dense_attention(inp), inp.num_tokens
    budget = budget_of(num_tokens, ratio)
    recent = budget // 2 if n_recent is None else min(n_recent, budget)
    column_sums = [[sum(row[j] for row in head) for j in range(num_tokens)] for head in att]
    kept = []
    for h in range(NUM_KV_HEADS):
        acc = group_mean(column_sums, h)
        heavy = top(acc, range(num_tokens - recent), budget - recent)
        kept.append(heavy | set(range(num_tokens - recent, num_tokens)))
    return kept


def scissorhands_reference(inp: PressInput, ratio: float, history: int, n_recent: int) -> list[set[int]]:
    """Scissorhands: fewest below-average marks in the history window, then most attention; recent kept."""
    att, num_tokens, num_queries = dense_attention(inp), inp.num_tokens, inp.queries.shape[1]
    budget = budget_of(num_tokens, ratio)
    recent = min(n_recent, budget)
    window = min(history, num_queries)
    kept = []
    for h in range(NUM_KV_HEADS):
        count, mass = [0] * num_tokens, [0.0] * num_tokens
        for qh in range(h * GROUP, (h + 1) * GROUP):
            for i in range(num_queries - window, num_queries):
                pos = num_tokens - num_queries + i
                for j in range(pos + 1):
                    count[j] += att[qh][i][j] < 1 / (pos + 1)
                    mass[j] += att[qh][i][j]
        older = sorted(range(num_tokens - recent), key=lambda j: (count[j], -mass[j]))
        kept.append(set(older[: budget - recent]) | set(range(num_tokens - recent, num_tokens)))
    return kept


def snapkv_pooled(inp: PressInput, window: int, kernel: int) -> list[list[float]]:
    """kvpress's SnapKV scores of the tokens before the window, per kv-head `[H_kv][T - w]`."""
    att, num_tokens = dense_attention(inp), inp.num_tokens
    length, pad = num_tokens - window, kernel // 2
    pooled = []
    for head in att:
        mean = [sum(row[j] for row in head[-window:]) / window for j in range(length)]
        # Average pooling, stride 1, zero padding counted in the mean.
        pooled.append(
            [
                sum(mean[k] for k in range(j - pad, j + pad + 1) if 0 <= k < length) / kernel
                for j in range(length)
            ]
        )
    return [group_mean(pooled, h) for h in range(NUM_KV_HEADS)]


def snapkv_reference(inp: PressInput, budget: int, window: int, kernel: int) -> list[set[int]]:
    """SnapKV: the observation window plus the best pooled scores before it."""
    num_tokens = inp.num_tokens
    return [
        top(scores, range(num_tokens - window), budget - window) | set(range(num_tokens - window, num_tokens))
        for scores in snapkv_pooled(inp, window, kernel)
    ]


def tova_reference(inp: PressInput, ratio: float) -> list[set[int]]:
    """TOVA: the last query's attention averaged over all heads; the last token kept."""
    att, num_tokens = dense_attention(inp), inp.num_tokens
    rows = [head[-1] for head in att]
    mean = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
    kept = top(mean, range(num_tokens - 1), budget_of(num_tokens, ratio) - 1) | {num_tokens - 1}
    return [kept] * NUM_KV_HEADS


def as_sets(kept: list[torch.Tensor]) -> list[set[int]]:
    return [set(k.tolist()) for k in kept]


@pytest.mark.parametrize(
    ("seed", "num_tokens", "num_queries"), [(0, 120, None), (3, 173, None), (4, 150, 40)]
)
@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_chunked_accumulated_attention_equals_dense_column_sums(
    seed: int, num_tokens: int, num_queries: int | None, chunk: int
) -> None:
    inp = make_input(num_tokens, num_queries, seed=seed)
    dense = torch.tensor(dense_attention(inp), dtype=torch.float64).sum(1)  # (H_q, T)
    torch.testing.assert_close(accumulated_attention(inp, chunk=chunk).double(), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("seed", "num_tokens", "num_queries"), [(0, 120, None), (5, 199, None), (6, 150, 30)]
)
@pytest.mark.parametrize(("ratio", "n_recent"), [(0.5, None), (0.75, None), (0.5, 10), (0.9, 40)])
def test_h2o_matches_reference(
    seed: int, num_tokens: int, num_queries: int | None, ratio: float, n_recent: int | None
) -> None:
    inp = make_input(num_tokens, num_queries, seed=seed)
    kept = make_press("h2o", ratio=ratio, n_recent=n_recent).keep(inp)
    assert as_sets(kept) == h2o_reference(inp, ratio, n_recent)


@pytest.mark.parametrize(
    ("seed", "num_tokens", "num_queries"), [(0, 120, None), (7, 180, None), (8, 150, 20)]
)
@pytest.mark.parametrize(("ratio", "history", "n_recent"), [(0.5, 64, 64), (0.6, 16, 8), (0.8, 30, 0)])
def test_scissorhands_matches_reference(
    seed: int, num_tokens: int, num_queries: int | None, ratio: float, history: int, n_recent: int
) -> None:
    inp = make_input(num_tokens, num_queries, seed=seed)
    press = make_press("scissorhands", ratio=ratio, history_window=history, n_recent=n_recent)
    assert as_sets(press.keep(inp)) == scissorhands_reference(inp, ratio, history, n_recent)


@pytest.mark.parametrize(("seed", "num_tokens"), [(0, 120), (9, 200), (10, 57)])
@pytest.mark.parametrize(("window", "kernel"), [(8, 5), (16, 3), (4, 1)])
def test_snapkv_matches_kvpress_scores_and_keeps_its_window(
    seed: int, num_tokens: int, window: int, kernel: int
) -> None:
    inp = make_input(num_tokens, seed=seed)
    press = SnapKVPress(ratio=0.6, window_size=window, kernel_size=kernel)
    scores = press.score(inp)  # (H_kv, T)
    pooled = torch.tensor(snapkv_pooled(inp, window, kernel), dtype=torch.float64)
    torch.testing.assert_close(scores[:, :-window].double(), pooled, atol=1e-6, rtol=1e-5)
    assert torch.all(scores[:, -window:] == scores[:, :-window].max() + 1)
    kept = as_sets(press.keep(inp))
    assert kept == snapkv_reference(inp, budget_of(num_tokens, 0.6), window, kernel)
    assert all(set(range(num_tokens - window, num_tokens)) <= k for k in kept)


def test_snapkv_window_shrinks_to_the_queries_available() -> None:
    inp = make_input(100, num_queries=12, seed=11)
    kept = make_press("snapkv", ratio=0.5).keep(inp)  # window 64 > 12 queries
    assert all(set(range(88, 100)) <= set(k.tolist()) for k in kept)


def test_pyramidkv_budgets_by_hand() -> None:
    press = PyramidKVPress(ratio=0.5, window_size=4, beta=5)
    # average 60, top layer 60 / 5 = 12, bottom 2 * 60 - 12 = 108, linear in between
    assert [press.layer_budget(120, layer, 5) for layer in range(5)] == [108, 84, 60, 36, 12]
    # 50 / 20 < window 64: the pyramid does not fit, every layer gets the SnapKV budget
    assert {PyramidKVPress(ratio=0.5).layer_budget(100, layer, 30) for layer in range(30)} == {50}


@pytest.mark.parametrize(
    ("num_tokens", "ratio", "num_layers"),
    [(4096, 0.5, 30), (8192, 0.8, 32), (2000, 0.3, 24), (16384, 0.9, 7), (5000, 0.7, 2)],
)
def test_pyramidkv_budgets_decrease_and_average_to_the_ratio(
    num_tokens: int, ratio: float, num_layers: int
) -> None:
    press = PyramidKVPress(ratio=ratio)
    budgets = [press.layer_budget(num_tokens, layer, num_layers) for layer in range(num_layers)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert abs(sum(budgets) - num_layers * num_tokens * (1 - ratio)) <= num_layers / 2


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_pyramidkv_matches_snapkv_reference_at_its_layer_budget(layer: int) -> None:
    inp = make_input(120, seed=12, layer=layer, num_layers=5)
    press = PyramidKVPress(ratio=0.5, window_size=4, kernel_size=3, beta=5)
    kept = press.keep(inp)
    budget = [108, 84, 60, 36, 12][layer]
    assert all(k.numel() == budget for k in kept)
    assert as_sets(kept) == snapkv_reference(inp, budget, 4, 3)


@pytest.mark.parametrize(
    ("seed", "num_tokens", "num_queries"), [(0, 120, None), (13, 190, None), (14, 80, 5)]
)
@pytest.mark.parametrize("ratio", [0.4, 0.85])
def test_tova_matches_reference_and_heads_agree(
    seed: int, num_tokens: int, num_queries: int | None, ratio: float
) -> None:
    inp = make_input(num_tokens, num_queries, seed=seed)
    kept = make_press("tova", ratio=ratio).keep(inp)
    assert all(torch.equal(kept[0], k) for k in kept)
    assert as_sets(kept) == tova_reference(inp, ratio)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("h2o", {"ratio": 1.0}, "ratio"),
        ("h2o", {"n_recent": -1}, "n_recent"),
        ("scissorhands", {"history_window": 0}, "history_window"),
        ("scissorhands", {"n_recent": 1.5}, "n_recent"),
        ("snapkv", {"window_size": 0}, "window_size"),
        ("snapkv", {"kernel_size": 4}, "kernel_size must be odd"),
        ("pyramidkv", {"beta": 0.5}, "beta"),
        ("pyramidkv", {"kernel_size": True}, "pyramidkv: kernel_size"),
        ("tova", {"ratio": -0.1}, "ratio"),
        ("tova", {"window_size": 8}, "press 'tova' has no hyperparameter 'window_size'"),
    ],
)
def test_bad_hyperparameters_are_rejected(name: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        make_press(name, **kwargs)
