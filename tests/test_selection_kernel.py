"""Block selection's two implementations (the C++ op and torch ops) against a float64 brute force.

The reference recomputes every block's key minimum and maximum from the keys
the pool holds, scores blocks in float64 (per query head `sum_d max(q_gd *
min_d, q_gd * max_d)`, one block at a time; summed over heads, or each head
relative to its best block and the largest over heads, or each head's softmax
over the blocks summed over heads) and takes sinks,
recent blocks and the top-k of the rest. Both implementations must pick the same set, up to blocks
whose float64 scores tie with the last one taken within float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_selection import GROUP, H_KV, D, context, filled_cache, reference_block_scores, reference_pick

from kvengine.cache.paged import PagedKVCache
from kvengine.cache.pool import BlockPool
from kvengine.config import CacheConfig
from kvengine.engine import selection as selection_module
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.engine.select_kernel import select_op
from kvengine.engine.selection import HEAD_SCORES, BlockSelection, select_blocks
from kvengine.models import LoadedModel

OP = select_op()
IMPLEMENTATIONS = ["torch", *(["kernel"] if OP is not None else [])]


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
    heads=st.sampled_from(HEAD_SCORES),
    neighbours=st.integers(0, 2),
)
def test_selection_equals_the_float64_brute_force(
    lens: list[list[int]],
    budget: int,
    sink: int,
    recent: int,
    block_size: int,
    seed: int,
    implementation: str,
    heads: str,
    neighbours: int,
) -> None:
    sel = BlockSelection(
        budget=max(budget, sink + recent), sink_blocks=sink, recent_blocks=recent, heads=heads,
        neighbours=neighbours,
    )  # fmt: skip
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
            keys = cache.pool.k[seq.slots[0, h, :n]]
            scores = reference_block_scores(keys, q[i, h * GROUP : (h + 1) * GROUP], block_size, heads)
            forced = {j for j in range(num_blocks) if j < sink or j >= num_blocks - recent}
            wanted = reference_pick(scores, num_blocks, min(k, num_blocks), sel)
            got = chosen_blocks(slots[i, h], int(new_lens[i, h]), block_size, seq.slots[0, h, :n])
            assert got == sorted(got) and forced <= set(got), "sinks and recent blocks, in cache order"
            assert len(got) == min(k, num_blocks)
            if set(got) != set(wanted):  # only exchanges between float64 near-ties (and what they bring)
                last = min((scores[j] for j in set(wanted) - forced), default=0.0)
                near = {j for j in range(num_blocks) if abs(scores[j] - last) <= 1e-4 * (1 + abs(last))}
                brought = {j + d for j in near for d in range(neighbours + 1)}
                assert set(got) ^ set(wanted) <= brought, (got, wanted)
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
@pytest.mark.parametrize("heads", HEAD_SCORES)
@pytest.mark.parametrize("neighbours", [0, 1])
def test_kernel_and_torch_agree_on_slots_and_positions(seed: int, heads: str, neighbours: int) -> None:
    """Both paths return the same tables, positions of the chosen tokens included, and the same counts."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, 90, (3, H_KV), generator=gen).tolist()
    sel = BlockSelection(budget=5, sink_blocks=1, recent_blocks=2, heads=heads, neighbours=neighbours)
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


def one_key_per_block(per_block: list[torch.Tensor]) -> tuple[PagedKVCache, object]:
    """A sequence whose blocks of 4 tokens each hold one repeated key (bounds are exact), on every kv-head."""
    pool = BlockPool(64, 4, D)
    pool.track_key_bounds()
    cache = PagedKVCache(pool, num_layers=1, num_kv_heads=H_KV)
    seq = cache.new_sequence()
    n = 4 * len(per_block)
    slots = cache.append(seq, n)[0]  # (H_kv, n)
    keys = torch.stack([per_block[t // 4] for t in range(n)])
    for h in range(H_KV):
        pool.write(slots[h], keys, torch.randn(n, D))
    return cache, seq


def chosen_by(
    cache: PagedKVCache, seq, q: torch.Tensor, sel: BlockSelection, implementation: str
) -> list[int]:  # type: ignore[no-untyped-def]
    """Block indices kv-head 0 reads under `sel`."""
    ctx = context(cache, [seq], sel, "gather")
    pool = cache.pool
    assert ctx.decode is not None and pool.key_bounds is not None
    new_slots, new_lens, *_ = select_blocks(
        sel, pool.key_bounds, q, ctx.decode.slots[0], ctx.decode.lens[0], pool.zero_slot,
        use_kernel=implementation == "kernel",
    )  # fmt: skip
    n = int(seq.lens[0, 0])
    return chosen_blocks(new_slots[0, 0], int(new_lens[0, 0]), 4, seq.slots[0, 0, :n])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_block_one_head_alone_looks_at_is_read_per_head_not_by_the_sum(implementation: str) -> None:
    """One query head's only match sits in block 3; the kv-head's two other heads, larger, look at 5 and 6.

    Ten blocks, budget 4 (sink 0, recent 9, two picks). Summed, the two large heads outvote the one:
    blocks 5 and 6. Per head, block 3 is head 0's best and block 5 the others' best: blocks 3 and 5.
    """
    e = torch.eye(D)
    per_block = [e[0]] * 10
    per_block[3], per_block[5], per_block[6] = 5 * e[1], e[2], 0.9 * e[2]
    cache, seq = one_key_per_block(per_block)
    q = torch.zeros(1, H_KV * GROUP, D)
    q[0, 0], q[0, 1], q[0, 2] = e[1], 10 * e[2] - e[1], 10 * e[2] - e[1]
    got = {
        heads: chosen_by(
            cache,
            seq,
            q,
            BlockSelection(budget=4, recent_blocks=1, heads=heads, neighbours=0),
            implementation,
        )
        for heads in HEAD_SCORES
    }
    # "mass": heads 1 and 2 put most of their (bound-estimated) weight on 5, less on 6; head 0 on 3 less so.
    assert got == {"max": [0, 3, 5, 9], "sum": [0, 5, 6, 9], "mass": [0, 5, 6, 9]}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mass_reads_a_peaked_heads_block_that_neither_sum_nor_max_reads(implementation: str) -> None:
    """Ten blocks, one pick beside sink 0 and recent 9. Head 0 is peaked on block 4 (bound 20, 0 elsewhere);
    head 1 is diffuse, its favourite block 2 barely ahead (0.5 against 0); head 2, large, is split
    between blocks 6 and 7 (100 each). The sum picks 6 (head 2 outvotes head 0); "max" ties every
    head's favourite at 0 and takes the earliest, head 1's block 2; "mass" sums the softmax shares:
    block 4 has ~0.99 of head 0's, block 6 half of head 2's, block 2 ~0.12 of head 1's: block 4.
    """
    e = torch.eye(D)
    per_block = [e[0]] * 10
    per_block[2], per_block[4], per_block[6], per_block[7] = 0.5 * e[3], e[1], e[2], e[2]
    cache, seq = one_key_per_block(per_block)
    q = torch.zeros(1, H_KV * GROUP, D)
    q[0, 0], q[0, 1], q[0, 2] = 20 * e[1], e[3], 100 * e[2]
    got = {
        heads: chosen_by(
            cache, seq, q, BlockSelection(budget=3, recent_blocks=1, heads=heads), implementation
        )
        for heads in HEAD_SCORES
    }
    assert got == {"sum": [0, 6, 9], "max": [0, 2, 9], "mass": [0, 4, 9]}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_pick_brings_its_successor_within_the_budget(implementation: str) -> None:
    """Block 3 matches the query (the words), block 4 (the value after them) does not; 6 and 7 half match.

    Budget 5 of 10 blocks (sink 0, recent 9): without neighbours, 3, 6 and 7; with one, the sink brings
    1, then 3 brings 4: blocks 0, 1, 3, 4, 9. Never a sink or recent block left out.
    """
    e = torch.eye(D)
    per_block = [-e[1]] * 10
    per_block[3], per_block[6], per_block[7] = 2 * e[1], e[1], e[1]
    cache, seq = one_key_per_block(per_block)
    q = torch.zeros(1, H_KV * GROUP, D)
    q[0, :GROUP] = e[1]
    got = [
        chosen_by(cache, seq, q, BlockSelection(budget=5, recent_blocks=1, neighbours=n), implementation)
        for n in (0, 1)
    ]
    assert got == [[0, 3, 6, 7, 9], [0, 1, 3, 4, 9]]


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


@pytest.mark.model
def test_the_bench_answers_with_every_setting_from_one_prefill(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`bench selection` with settings of their own ratio and dense layers: rows, blocks read, resuming."""
    import json

    from kvengine.bench.selection import run_selection_bench, summarize_file
    from kvengine.errors import InvalidRequestError

    out, report = tmp_path / "rows.jsonl", tmp_path / "report.md"
    with pytest.raises(InvalidRequestError, match="heads must be one of"):
        run_selection_bench("smollm2-135m", [320], 0.875, [1], 1, out, report, also=[{"heads": "mean"}])
    with pytest.raises(InvalidRequestError, match="has no hyperparameter 'neighbors'"):
        run_selection_bench("smollm2-135m", [320], 0.875, [1], 1, out, report, quest={"neighbors": 1})
    with pytest.raises(InvalidRequestError, match="ratio must be a number, got 'x'"):
        run_selection_bench("smollm2-135m", [320], 0.875, [1], 1, out, report, also=[{"ratio": "x"}])
    with pytest.raises(InvalidRequestError, match="unknown task 'niah'"):
        run_selection_bench("smollm2-135m", [320], 0.875, [1], 1, out, report, tasks=["niah"])
    quest, also = {"heads": "sum", "neighbours": 1}, [{"heads": "mass"}, {"ratio": 0.9, "dense_layers": 2}]
    run = dict(examples=1, max_tokens=4, quest=quest, also=also, tasks=["needle_hard", "niah_multiquery"])
    rows = run_selection_bench("smollm2-135m", [320], 0.75, [1], 1, out, report, **run)  # type: ignore[arg-type]
    answers = {(r["config"]["task"], r["config"]["system"]): r for r in rows if r["metric"] == "score"}
    systems = {"full", "quest", "quest_heads=mass", "quest_ratio=0.9,dense_layers=2"}
    assert set(answers) == {(t, s) for t in ("needle_hard", "niah_multiquery") for s in systems}
    assert len(answers["niah_multiquery", "full"]["config"]["outputs"]) == 4  # every question answered
    for task in ("needle_hard", "niah_multiquery"):
        full = answers[task, "full"]["config"]
        assert full["blocks_read"] == full["blocks_held"] == 0  # full reads without selection
        dense = answers[task, "quest_ratio=0.9,dense_layers=2"]["config"]
        # 30 layers, ~21 blocks per cell: 2 layers read all, 28 read ceil(0.1 x ~21) = 3 (sink, recent).
        assert 0.17 < dense["blocks_read"] / dense["blocks_held"] < 0.25
        assert answers[task, "quest_heads=mass"]["config"]["heads"] == "mass"
    assert len(out.read_text().splitlines()) == len(rows)
    assert run_selection_bench("smollm2-135m", [320], 0.75, [1], 1, out, report, **run) == []  # type: ignore[arg-type]
    table = summarize_file(out).splitlines()
    assert table[0].startswith("| task | length | setting | examples | full correct |")
    assert len(table) == 2 + 3 * 3  # per task and pooled, three settings
    assert "quest_heads=mass" in report.read_text()
    assert all(json.loads(line)["bench"] == "selection" for line in out.read_text().splitlines())


def test_the_bench_options_parse_hyperparameters_and_name_bad_ones() -> None:
    import argparse

    from kvengine.cli.argtypes import key_values

    assert key_values("heads=sum, neighbours=1") == {"heads": "sum", "neighbours": 1}
    assert key_values("") == {}
    with pytest.raises(
        argparse.ArgumentTypeError, match="expected KEY=VALUE pairs, comma-separated, got 'heads'"
    ):
        key_values("heads,neighbours=1")
