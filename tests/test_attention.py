"""`attend` against a dense reference: explicit masks, repeated kv-heads, plain softmax."""

from __future__ import annotations

import pytest
import torch

from kvengine.engine.attention import attend

H_Q, H_KV, D = 6, 2, 8


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], window: int | None
) -> torch.Tensor:
    """Head by head in float64: query i of head h sits at index lens[h] - T_q + i."""
    group = H_Q // H_KV
    q_len = q.shape[1]
    out = torch.empty_like(q, dtype=torch.float64)
    for h in range(H_Q):
        kv_h = h // group
        n = lens[kv_h]
        kh, vh = k[kv_h, :n].double(), v[kv_h, :n].double()
        for i in range(q_len):
            pos = n - q_len + i
            lo = 0 if window is None else max(0, pos - window + 1)
            scores = (kh[lo : pos + 1] @ q[h, i].double()) / D**0.5
            out[h, i] = scores.softmax(0) @ vh[lo : pos + 1]
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
