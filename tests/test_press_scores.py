"""Presses that need no attention weights, and the budget wrappers (AdaKV, per layer).

Each press is compared with its paper's rule written naively here (loops,
float64, transformers' own RoPE), on random GQA inputs: 2 kv-heads, 4 query
heads, T around 50-200.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvengine.errors import InvalidRequestError
from kvengine.press import PRESSES, PressInput, ScorePress, make_press
from kvengine.press.adakv import AdaKV
from kvengine.press.base import num_kept
from kvengine.press.expected_attention import ExpectedAttentionPress, unrotate
from kvengine.press.keydiff import KeyDiffPress
from kvengine.press.knorm import KnormPress
from kvengine.press.none import NoPress
from kvengine.press.per_layer import PerLayerPress
from kvengine.press.random import RandomPress
from kvengine.press.streaming_llm import StreamingLLMPress

H_KV, H_Q, HEAD_DIM, NUM_LAYERS = 2, 4, 16, 4

# --- shared helpers ------------------------------------------------------------------------------------


def llama_rope(head_dim: int = HEAD_DIM) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """transformers' Llama rotary embedding as `positions (N,) -> (cos, sin)`, each `(N, D)`."""
    config = transformers.LlamaConfig(
        hidden_size=H_Q * head_dim, num_attention_heads=H_Q, num_key_value_heads=H_KV, head_dim=head_dim
    )
    emb = LlamaRotaryEmbedding(config)

    def rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = emb(torch.zeros(1), positions[None])
        return cos[0], sin[0]

    return rope


@dataclass
class Case:
    inp: PressInput
    prerope_queries: torch.Tensor  # (H_q, T_q, D): the ground truth the press must recover


def make_input(
    num_tokens: int = 96,
    num_queries: int | None = None,
    seed: int = 0,
    layer: int = 0,
    start: int = 0,
    with_rope: bool = True,
) -> Case:
    """A random layer: keys and values of varied norms, queries with a per-head mean, RoPE'd."""
    g = torch.Generator().manual_seed(seed)
    num_queries = num_tokens if num_queries is None else num_queries
    keys = torch.randn(H_KV, num_tokens, HEAD_DIM, generator=g) * (
        0.5 + torch.rand(H_KV, num_tokens, 1, generator=g)
    )
    values = torch.randn(H_KV, num_tokens, HEAD_DIM, generator=g) * (
        0.5 + torch.rand(H_KV, num_tokens, 1, generator=g)
    )
    prerope = torch.randn(H_Q, num_queries, HEAD_DIM, generator=g) + 2 * torch.randn(
        H_Q, 1, HEAD_DIM, generator=g
    )
    positions = start + torch.arange(num_tokens)
    rope = llama_rope()
    cos, sin = rope(positions[num_tokens - num_queries :])
    queries, _ = apply_rotary_pos_emb(prerope[None], prerope[None], cos[None], sin[None])
    inp = PressInput(
        layer=layer,
        num_layers=NUM_LAYERS,
        keys=keys,
        values=values,
        queries=queries[0],
        scaling=HEAD_DIM**-0.5,
        positions=positions,
        rope=rope if with_rope else None,
    )
    return Case(inp, prerope)


def as_lists(kept: list[torch.Tensor]) -> list[list[int]]:
    return [k.tolist() for k in kept]


def bottom_k(values: list[float], k: int) -> list[int]:
    """Sorted indices of the k smallest values (naive)."""
    return sorted(sorted(range(len(values)), key=lambda t: values[t])[:k])


# --- (1) the contract of every registered press, and ratio 0: test_press_contract.py --------------------


def test_registry_builds_each_press_and_the_wrappers_compose() -> None:
    assert isinstance(make_press("adakv", press=make_press("knorm", ratio=0.5)), AdaKV)
    press = make_press("per_layer", press=make_press("expected_attention"), ratios=[0.1, 0.2, 0.3, 0.6])
    assert isinstance(press, PerLayerPress) and press.ratios == (0.1, 0.2, 0.3, 0.6)
    assert press.ratio == pytest.approx(0.3)
    for name, cls in PRESSES.items():  # every press with a ratio of its own ('none' has 0 only)
        if name != "none" and "ratio" in {f.name for f in dataclasses.fields(cls) if f.init}:  # type: ignore[arg-type]
            assert make_press(name, ratio=0.25).ratio == 0.25, name


# --- (2) each press against its rule written naively --------------------------------------------------


def test_random_is_seeded_uniform_and_differs_across_layers_and_heads() -> None:
    inp = make_input(60).inp
    counts = torch.zeros(H_KV, 60)
    for seed in range(300):
        for h, idx in enumerate(RandomPress(ratio=0.5, seed=seed).keep(inp)):
            counts[h, idx] += 1
    freq = counts / 300  # each token is kept with probability 1/2 (Binomial std 0.03)
    assert freq.min() > 0.35 and freq.max() < 0.65, freq
    press = RandomPress(ratio=0.5, seed=7)
    layer0 = as_lists(press.keep(inp))
    layer1 = as_lists(press.keep(make_input(60, layer=1).inp))
    assert layer0 != layer1 and layer0[0] != layer0[1]
    assert layer0 != as_lists(RandomPress(ratio=0.5, seed=8).keep(inp))


@pytest.mark.parametrize(
    ("num_tokens", "ratio", "n_sink"), [(96, 0.5, 4), (61, 0.8, 4), (50, 0.3, 0), (80, 0.85, 8)]
)
def test_streaming_llm_keeps_sinks_and_recent_window(num_tokens: int, ratio: float, n_sink: int) -> None:
    budget = num_kept(num_tokens, ratio)
    window = budget - n_sink
    expected = list(range(n_sink)) + list(range(num_tokens - window, num_tokens))
    kept = StreamingLLMPress(ratio=ratio, n_sink=n_sink).keep(make_input(num_tokens).inp)
    assert as_lists(kept) == [expected] * H_KV


def test_streaming_llm_sinks_larger_than_budget_is_refused() -> None:
    press = StreamingLLMPress(ratio=0.75, n_sink=16)
    with pytest.raises(InvalidRequestError, match=r"16 sink tokens .* budget of 12 tokens"):
        press.keep(make_input(50).inp)  # budget int(50 * 0.25) = 12


@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_knorm_keeps_smallest_key_norms(ratio: float) -> None:
    inp = make_input(120, seed=1).inp
    budget = num_kept(120, ratio)
    expected = []
    for h in range(H_KV):
        norms = [sum(x * x for x in inp.keys[h, t].tolist()) ** 0.5 for t in range(120)]
        expected.append(bottom_k(norms, budget))
    assert as_lists(KnormPress(ratio=ratio).keep(inp)) == expected


@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_keydiff_keeps_keys_least_similar_to_mean_direction(ratio: float) -> None:
    inp = make_input(110, seed=2).inp
    budget = num_kept(110, ratio)
    expected = []
    for h in range(H_KV):
        keys = inp.keys[h].double()
        anchor = sum(k / k.norm() for k in keys) / len(keys)
        cosine = [float(k @ anchor / (k.norm() * anchor.norm())) for k in keys]
        expected.append(bottom_k(cosine, budget))  # most similar to the anchor are evicted
    assert as_lists(KeyDiffPress(ratio=ratio).keep(inp)) == expected


def expected_attention_reference(case: Case, press: ExpectedAttentionPress) -> torch.Tensor:
    """The paper's expected-attention score, float64, from the true pre-RoPE queries `(H_kv, T)`."""
    inp = case.inp
    assert inp.rope is not None and inp.positions is not None
    num_tokens, num_queries, d = inp.num_tokens, case.prerope_queries.shape[1], HEAD_DIM
    query_tokens = torch.arange(num_tokens - num_queries, num_tokens)
    queries = case.prerope_queries.double()[:, query_tokens >= press.n_sink]  # sinks' queries left out
    # The RoPE matrix at each future position, from transformers' apply_rotary_pos_emb on a basis.
    future = inp.positions[-1] + 1 + torch.arange(press.n_future_positions)
    cos, sin = (t.double()[:, None].expand(-1, d, d) for t in inp.rope(future))  # (N, D, D)
    basis = torch.eye(d, dtype=torch.float64).expand(len(future), 1, d, d)
    rows, _ = apply_rotary_pos_emb(basis, basis, cos, sin)  # row j of [p] = R_p e_j
    rot = rows[:, 0].transpose(1, 2).mean(0)  # (D, D)
    sink = min(press.n_sink, num_tokens)
    scores = torch.zeros(H_KV, num_tokens - sink, dtype=torch.float64)
    for h in range(H_Q):
        mean = rot @ queries[h].mean(0)
        cov = rot @ torch.cov(queries[h].T, correction=0) @ rot.T
        kv_head = h // (H_Q // H_KV)
        logits = []
        for k in inp.keys[kv_head, sink:].double():
            quad = float(k @ cov @ k) if press.use_covariance else 0.0
            logits.append(float(mean @ k) * inp.scaling + 0.5 * inp.scaling**2 * quad)
        scores[kv_head] += torch.tensor(logits, dtype=torch.float64).softmax(0) / (H_Q // H_KV)
    if press.use_vnorm:
        scores = (scores + press.epsilon) * inp.values[:, sink:].double().norm(dim=-1)
    return torch.cat([torch.full((H_KV, sink), float(scores.max()) + 1, dtype=torch.float64), scores], 1)


EA_CASES = [
    (dict(ratio=0.5), dict(num_tokens=96)),
    (dict(ratio=0.7, n_future_positions=64), dict(num_tokens=150, num_queries=30, start=40)),
    (dict(ratio=0.5, use_covariance=False), dict(num_tokens=80)),
    (dict(ratio=0.4, use_vnorm=False, n_sink=0), dict(num_tokens=64, num_queries=16)),
    (dict(ratio=0.6, epsilon=0.01, n_sink=6), dict(num_tokens=60, num_queries=58)),  # sinks partly queried
]


@pytest.mark.parametrize(("kwargs", "shape"), EA_CASES)
def test_expected_attention_matches_reference(kwargs: dict, shape: dict) -> None:
    case = make_input(seed=4, **shape)
    press = ExpectedAttentionPress(**kwargs)
    reference = expected_attention_reference(case, press)
    scores = press.score(case.inp)
    torch.testing.assert_close(scores.double(), reference, rtol=1e-4, atol=1e-7)
    budget = num_kept(case.inp.num_tokens, press.ratio)
    expected = [sorted(torch.topk(row, budget).indices.tolist()) for row in reference]
    assert as_lists(press.keep(case.inp)) == expected
    assert all(set(range(min(press.n_sink, budget))) <= set(row) for row in expected), "sinks kept"


def test_expected_attention_without_rope_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequestError, match="rotary embedding"):
        ExpectedAttentionPress(ratio=0.5).keep(make_input(40, with_rope=False).inp)


@pytest.mark.parametrize("attention_factor", [1.0, 1.3])
def test_unrotate_inverts_transformers_rope(attention_factor: float) -> None:
    case = make_input(30, start=5)
    assert case.inp.rope is not None and case.inp.positions is not None
    cos, sin = (t * attention_factor for t in case.inp.rope(case.inp.positions))
    q = case.prerope_queries
    rotated, _ = apply_rotary_pos_emb(q[None], q[None], cos[None], sin[None])
    torch.testing.assert_close(unrotate(rotated[0], cos, sin), q, rtol=1e-5, atol=1e-5)


# --- wrappers -----------------------------------------------------------------------------------------


def adakv_reference(scores: torch.Tensor, per_head: int, alpha: float) -> list[list[int]]:
    """Each head's int(alpha * per_head) best tokens, then the best of the rest across heads."""
    num_heads, num_tokens = scores.shape
    num_safe = int(per_head * alpha)
    kept: list[set[int]] = []
    for h in range(num_heads):
        order = sorted(range(num_tokens), key=lambda t: -float(scores[h, t]))
        kept.append(set(order[:num_safe]))
    rest = [
        (float(scores[h, t]), h, t) for h in range(num_heads) for t in range(num_tokens) if t not in kept[h]
    ]
    rest.sort(key=lambda entry: -entry[0])
    for _, h, t in rest[: num_heads * per_head - num_heads * num_safe]:
        kept[h].add(t)
    return [sorted(k) for k in kept]


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("inner", ["knorm", "expected_attention", "keydiff"])
def test_adakv_matches_global_top_k_with_safeguard(inner: str, alpha: float) -> None:
    case = make_input(100, seed=5)
    case.inp.keys[1] *= 3  # head 1's keys score lower under knorm: its budget shrinks
    wrapped = make_press(inner, ratio=0.6)
    assert isinstance(wrapped, ScorePress)
    kept = as_lists(AdaKV(wrapped, alpha_safeguard=alpha).keep(case.inp))
    per_head = num_kept(100, 0.6)
    assert kept == adakv_reference(wrapped.score(case.inp), per_head, alpha)
    assert sum(len(k) for k in kept) == H_KV * per_head, "the layer's bytes equal the uniform budget's"
    if alpha == 1.0:
        assert kept == as_lists(wrapped.keep(case.inp)), "a full safeguard is the uniform budget"
    if inner == "knorm" and alpha < 1.0:
        assert len(kept[1]) < per_head < len(kept[0]), "head-wise budgets differ"
    if inner == "knorm" and alpha in (0.2, 0.5):
        assert len(kept[1]) == int(per_head * alpha), "the safeguard binds for head 1"


class InfScores(ScorePress):
    """Head 0 scores every token +inf; head 1 ranks tokens by index."""

    def score(self, inp: PressInput) -> torch.Tensor:
        scores = torch.arange(inp.num_tokens, dtype=torch.float32).repeat(inp.num_kv_heads, 1)
        scores[0] = float("inf")
        return scores


def test_adakv_safeguard_holds_when_scores_are_infinite() -> None:
    inp = make_input(50).inp
    kept = AdaKV(InfScores(ratio=0.5), alpha_safeguard=0.2).keep(inp)
    reference = adakv_reference(InfScores(ratio=0.5).score(inp), 25, 0.2)
    # Head 0's tokens all tie at +inf, so only how many it keeps is defined.
    assert kept[0].numel() == len(reference[0]) == 45
    assert kept[1].tolist() == reference[1] == list(range(45, 50))  # int(0.2 * 25) = 5 best of head 1


def test_adakv_ratio_is_the_wrapped_press_ratio() -> None:
    press = AdaKV(KnormPress(ratio=0.5))
    assert press.ratio == 0.5
    press.ratio = 0.25
    assert press.press.ratio == 0.25
    with pytest.raises(InvalidRequestError, match="ratio"):
        press.ratio = 1.5


def test_per_layer_uses_each_layers_ratio_and_leaves_the_press_alone() -> None:
    ratios = (0.2, 0.5, 0.0, 0.9)
    inner = KnormPress(ratio=0.1)
    press = PerLayerPress(inner, ratios=ratios)
    for layer, ratio in enumerate(ratios):
        inp = make_input(80, seed=6, layer=layer).inp
        norms = inp.keys.norm(dim=-1).tolist()
        expected = [bottom_k(norms[h], num_kept(80, ratio)) for h in range(H_KV)]
        assert as_lists(press.keep(inp)) == expected
    assert inner.ratio == 0.1
    assert press.ratio == pytest.approx(sum(ratios) / 4)


def test_per_layer_needs_one_ratio_per_layer() -> None:
    press = PerLayerPress(KnormPress(), ratios=(0.5, 0.5))
    with pytest.raises(InvalidRequestError, match="2 ratios given but the model has 4 layers"):
        press.keep(make_input(40).inp)


# --- (4) bad hyperparameters --------------------------------------------------------------------------


BAD = [
    ("random", dict(ratio=1.0), r"ratio must be in \[0, 1\), got 1.0"),
    ("random", dict(ratio=-0.1), "ratio must be in"),
    ("random", dict(seed=-1), "seed must be an integer >= 0"),
    ("random", dict(seed=1.5), "seed must be an integer"),
    ("streaming_llm", dict(n_sink=-1), "n_sink must be an integer >= 0, got -1"),
    ("knorm", dict(ratio=True), "ratio must be in"),
    ("keydiff", dict(ratio="0.5"), "ratio must be in"),
    ("knorm", dict(bogus=1), "press 'knorm' has no hyperparameter 'bogus'; it has: ratio"),
    ("expected_attention", dict(n_future_positions=0), "n_future_positions must be an integer >= 1"),
    ("expected_attention", dict(n_sink=2.0), "n_sink must be an integer"),
    ("expected_attention", dict(epsilon=-1.0), "epsilon must be a finite number >= 0"),
    ("expected_attention", dict(epsilon=float("nan")), "epsilon must be"),
    ("expected_attention", dict(use_covariance=1), "use_covariance must be True or False"),
    ("adakv", dict(), "bad arguments for press 'adakv'"),
    ("adakv", dict(press=NoPress()), "adakv wraps a score press .* got NoPress"),
    ("adakv", dict(press=KnormPress(), alpha_safeguard=1.5), r"alpha_safeguard must be in \[0, 1\], got 1.5"),
    ("per_layer", dict(press=KnormPress(), ratios=()), "ratios must be a non-empty list"),
    ("per_layer", dict(press=KnormPress(), ratios=0.5), "ratios must be a non-empty list"),
    ("per_layer", dict(press=KnormPress(), ratios=(0.1, 1.2)), r"ratios\[1\]: compression ratio must be in"),
    ("per_layer", dict(press=AdaKV(KnormPress()), ratios=(0.5,)), "per_layer wraps a score press"),
]


@pytest.mark.parametrize(("name", "kwargs", "message"), BAD)
def test_bad_hyperparameters_are_invalid_requests(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        make_press(name, **kwargs)
