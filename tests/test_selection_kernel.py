"""Block selection's two implementations (the C++ op and torch ops) against a float64 brute force.

The reference recomputes every block's key minimum and maximum from the keys
the pool holds, scores blocks in float64 (`sum_g sum_d max(q_gd * min_d,
q_gd * max_d)`, one block at a time) and takes sinks, recent blocks and the
top-k of the rest. Both implementations must pick the same set, up to blocks
whose float64 scores tie with the last one taken within float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_selection import GROUP, H_KV, context, filled_cache

from kvengine.config import CacheConfig
from kvengine.engine import selection as selection_module
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.engine.select_kernel import select_op
from kvengine.engine.selection import BlockSelection, select_blocks
from kvengine.models import LoadedModel

OP = select_op()
IMPLEMENTATIONS = ["torch", *(["kernel"] if OP is not None else [])]


def reference_scores(cache, seq, head: int, q: torch.Tensor) -> list[float]:  # type: ignore[no-untyped-def]
    """float64 bound of every block of one cell, from the keys themselves; q `(G, D)`."""
    bs, n = cache.block_size, int(seq.lens[0, head])
    keys = cache.pool.k[seq.slots[0, head, :n]].double()
    out = []
    for j in range(-(-n // bs)):
        block = keys[j * bs : (j + 1) * bs]
        lo, hi = block.min(0).values, block.max(0).values
        qd = q.double()
        out.append(float(torch.maximum(qd * lo, qd * hi).sum()))
    return out


def chosen_blocks(slots: torch.Tensor, length: int, bs: int, cell: torch.Tensor) -> list[int]:
    """Which blocks of a cell (by index) a selected slot table holds, in order."""
    firsts = slots[:length:bs].tolist() if length else []
    starts = {int(cell[j * bs]): j for j in range(-(-cell.numel() // bs))}
    return [starts[s] for s in firsts]


@settings(max_examples=30, deadline=None)
@given(
    lens=st.lists(st.lists(st.integers(1, 120), min_size=H_KV, max_size=H_KV), min_size=1, max_size=4),
    budget=st.integers(3, 12),
    sink=st.integers(0, 2),
    recent=st.integers(1, 3),
    block_size=st.sampled_from([4, 16]),  # 4 x 2 x 30 blocks at most: the test pool holds 512
    seed=st.integers(0, 10_000),
    implementation=st.sampled_from(IMPLEMENTATIONS),
)
def test_selection_equals_the_float64_brute_force(
    lens: list[list[int]],
    budget: int,
    sink: int,
    recent: int,
    block_size: int,
    seed: int,
    implementation: str,
) -> None:
    sel = BlockSelection(budget=max(budget, sink + recent), sink_blocks=sink, recent_blocks=recent)
    cache, seqs, q = filled_cache(lens, block_size, seed)
    ctx = context(cache, seqs, sel, "gather")
    assert ctx.decode is not None and cache.pool.key_bounds is not None
    slots, new_lens, _, read, held = select_blocks(
        sel, cache.pool.key_bounds, q, ctx.decode.slots[0], ctx.decode.lens[0], cache.pool.zero_slot,
        use_kernel=implementation == "kernel",
    )  # fmt: skip
    width = ctx.decode.slots.shape[-1]
    k = sel.blocks_to_read(-(-width // block_size))
    total_read = 0
    for i, seq in enumerate(seqs):
        for h in range(H_KV):
            n = int(seq.lens[0, h])
            num_blocks = -(-n // block_size)
            scores = reference_scores(cache, seq, h, q[i, h * GROUP : (h + 1) * GROUP])
            forced = {j for j in range(num_blocks) if j < sink or j >= num_blocks - recent}
            rest = sorted(set(range(num_blocks)) - forced, key=lambda j: -scores[j])
            take = max(0, min(k, num_blocks) - len(forced))
            got = chosen_blocks(slots[i, h], int(new_lens[i, h]), block_size, seq.slots[0, h, :n])
            assert got == sorted(got) and forced <= set(got), "sinks and recent blocks, in cache order"
            assert len(got) == min(k, num_blocks)
            picked, wanted = set(got) - forced, set(rest[:take])
            if picked != wanted:  # only exchanges between float64 near-ties
                last = scores[rest[take - 1]]
                for j in picked ^ wanted:
                    assert abs(scores[j] - last) <= 1e-4 * (1 + abs(last)), (j, scores[j], last)
            # The new table holds exactly the chosen blocks' tokens, then the zero slot.
            cell = seq.slots[0, h, :n]
            want = torch.cat([cell[j * block_size : (j + 1) * block_size] for j in got])
            m = int(new_lens[i, h])
            assert torch.equal(slots[i, h, :m], want)
            assert bool((slots[i, h, m:] == cache.pool.zero_slot).all())
            total_read += len(got)
    assert int(read) == total_read if k < -(-width // block_size) else True
    assert int(held) == sum(-(-n // block_size) for row in lens for n in row)


@pytest.mark.skipif(OP is None, reason="the selection kernel does not build here")
@pytest.mark.parametrize("seed", range(4))
def test_kernel_and_torch_agree_on_slots_and_positions(seed: int) -> None:
    """Both paths return the same tables, positions of the chosen tokens included, and the same counts."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, 90, (3, H_KV), generator=gen).tolist()
    sel = BlockSelection(budget=5, sink_blocks=1, recent_blocks=2)
    cache, seqs, q = filled_cache(lens, 4, seed)
    ctx = context(cache, seqs, sel, "gather")
    assert ctx.decode is not None and cache.pool.key_bounds is not None
    slots, lens_t = ctx.decode.slots[0], ctx.decode.lens[0]
    positions = torch.randint(0, 10_000, slots.shape, generator=gen)
    args = (sel, cache.pool.key_bounds, q, slots, lens_t, cache.pool.zero_slot, positions)
    by_kernel = select_blocks(*args, use_kernel=True)
    by_torch = select_blocks(*args, use_kernel=False)
    for a, b in zip(by_kernel, by_torch, strict=True):
        assert a is not None and b is not None
        assert torch.equal(a, b)
    new_slots, new_lens, new_positions = by_kernel[:3]
    assert new_positions is not None
    # Each kept slot keeps the position recorded for it.
    for i in range(len(lens)):
        for h in range(H_KV):
            where = {int(s): int(p) for s, p in zip(slots[i, h], positions[i, h], strict=True)}
            for t in range(int(new_lens[i, h])):
                assert int(new_positions[i, h, t]) == where[int(new_slots[i, h, t])]


def test_engine_answers_the_same_with_either_implementation(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(8)).tolist()
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outputs = []
    for implementation in IMPLEMENTATIONS:
        if implementation == "torch":
            monkeypatch.setattr(selection_module, "select_op", lambda: None)
        else:
            monkeypatch.setattr(selection_module, "select_op", select_op)
        engine = Engine(tiny_llama, CacheConfig(block_size=4, max_kv_bytes=2**22, select_blocks=0.25))
        outputs.append(
            (engine.generate([prompt], params)[0].output_ids, engine.runner.selection_stats.read_fraction)
        )
    assert all(out == outputs[0] for out in outputs)
    assert 0.24 < outputs[0][1] < 0.30


def test_the_bench_summary_counts_each_example_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Rows of two split runs (and a rerun of one seed): answers counted per seed, medians of medians."""
    from kvengine.bench.selection import summarize_file
    from kvengine.results import append_rows, make_row

    def example(seed: int, right: dict[str, float], step_full: float) -> list[dict]:  # type: ignore[type-arg]
        rows = [
            make_row("selection", "correct", v, "bool", system=s, length=64, seed=seed)
            for s, v in right.items()
        ]
        timings = dict(step_full=step_full, step_quest=1.0, attention_full_b1=4.0, attention_quest_b1=1.0,
                       selection_b1=0.5)  # fmt: skip
        rows.append(make_row("selection", "example_medians_s", 0.0, "s", length=64, seed=seed, **timings,
                             blocks_read=1, blocks_held=8))  # fmt: skip
        return rows

    path = tmp_path / "rows.jsonl"
    append_rows(path, example(0, {"full": 1.0, "quest": 0.0}, 2.0))
    append_rows(path, example(1, {"full": 1.0, "quest": 1.0}, 4.0))
    append_rows(path, example(1, {"full": 0.0, "quest": 1.0}, 6.0))  # a rerun of seed 1: the last rows win
    append_rows(path, [make_row("selection", "correct", 1.0, "bool", system="full", length=64, seed=9)])
    first, second = summarize_file(path).split("\n\n")
    assert first.splitlines()[2] == "| 64 | 2 | 1 | 1 | 0.125 | 4000.0 | 1000.0 | 0.25 |"
    assert second.splitlines()[2] == "| 64 | 1 | 4000.00 | 1000.00 | 0.25 | 500.00 |"
