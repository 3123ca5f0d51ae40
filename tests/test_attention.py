"""`attend` against a dense reference: explicit masks, repeated kv-heads, plain softmax."""

from __future__ import annotations

import pytest
import torch

from kvengine.engine.attention import attend

H_Q, H_KV, D = 6, 2, 8


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lens: list[int],
    window: int | None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head by head in float64: query i of head h is entry lens[h] - T_q + i of the head's cache;
    it sees the entries up to itself whose position (`positions[h]`, default the index) is
    less than `window` behind its own."""
    group = H_Q // H_KV
    q_len = q.shape[1]
    out = torch.empty_like(q, dtype=torch.float64)
    for h in range(H_Q):
        kv_h = h // group
        n = lens[kv_h]
        kh, vh = k[kv_h, :n].double(), v[kv_h, :n].double()
        pos = torch.arange(n) if positions is None else positions[kv_h, :n]
        for i in range(q_len):
            idx = n - q_len + i
            seen = torch.arange(n) <= idx
            if window is not None:
                seen &= pos > pos[idx] - window
            scores = (kh[seen] @ q[h, i].double()) / D**0.5
            out[h, i] = scores.softmax(0) @ vh[seen]
    return out


@pytest.mark.parametrize(
    ("q_len", "lens", "window"),
    [
        (7, [7, 7], None),  # fresh prefill
        (1, [9, 9], None),  # decode
        (3, [10, 10], None),  # chunk after a cached prefix
        (1, [4, 9], None),  # decode with per-head lengths (after a press)
        (3, [5, 8], None),  # chunk with per-head lengths
        (6, [6, 6], 3),  # sliding window prefill
        (1, [12, 12], 4),  # sliding window decode
    ],
)
def test_attend_matches_dense(q_len: int, lens: list[int], window: int | None) -> None:
    torch.manual_seed(0)
    k_len = max(lens)
    q = torch.randn(H_Q, q_len, D)
    k, v = torch.randn(H_KV, k_len, D), torch.randn(H_KV, k_len, D)
    uniform = len(set(lens)) == 1
    head_lens = None if uniform else torch.tensor(lens)
    out = attend(q, k, v, None, head_lens, window)
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, lens, window), atol=1e-5, rtol=1e-5)


def test_padding_past_a_head_length_is_ignored() -> None:
    torch.manual_seed(1)
    q = torch.randn(H_Q, 2, D)
    k, v = torch.randn(H_KV, 9, D), torch.randn(H_KV, 9, D)
    lens = torch.tensor([5, 9])
    out = attend(q, k, v, None, lens)
    k2, v2 = k.clone(), v.clone()
    k2[0, 5:], v2[0, 5:] = 1e4, -1e4  # garbage in head 0's padding
    torch.testing.assert_close(attend(q, k2, v2, None, lens), out)


@pytest.mark.parametrize(("q_len", "lens"), [(1, [12, 12]), (4, [12, 12]), (1, [7, 12]), (3, [9, 12])])
def test_window_after_eviction_is_over_positions(q_len: int, lens: list[int]) -> None:
    """Each head kept other tokens of a 40-token context: its window counts positions, not entries."""
    torch.manual_seed(2)
    window, k_len = 6, max(lens)
    q = torch.randn(H_Q, q_len, D)
    k, v = torch.randn(H_KV, k_len, D), torch.randn(H_KV, k_len, D)
    positions = torch.zeros(H_KV, k_len, dtype=torch.int64)
    for h, n in enumerate(lens):  # a sorted subset of 0..39 ending in the q_len new positions 40, 41, ...
        kept = torch.randperm(40, generator=torch.Generator().manual_seed(h))[: n - q_len].sort().values
        positions[h, :n] = torch.cat([kept, 40 + torch.arange(q_len)])
    head_lens = None if len(set(lens)) == 1 else torch.tensor(lens)
    out = attend(q, k, v, None, head_lens, window, positions)
    expected = dense_reference(q, k, v, lens, window, positions)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
