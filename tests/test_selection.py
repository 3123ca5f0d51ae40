"""Query-aware block selection (Quest): bounds, which blocks are read, attention over them, the engine.

References: brute-force per-block key bounds and top-k; float64 dense
attention over the tokens of the blocks the brute force picks; the engine
without selection (and transformers) token for token.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import hf_greedy
from hypothesis import given, settings
from hypothesis import strategies as st

from kvengine.cache.paged import PagedKVCache
from kvengine.cache.pool import BlockPool
from kvengine.config import CacheConfig
from kvengine.engine.attention import ForwardContext, SeqSpan, _decode, decode_batch
from kvengine.engine.engine import Engine
from kvengine.engine.kernel import paged_decode
from kvengine.engine.request import SamplingParams
from kvengine.engine.selection import HEAD_SCORES, BlockSelection, SelectionStats, select_blocks
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press.methods import make_method, method_or_press

D, H_KV, GROUP = 8, 2, 3
KERNEL = paged_decode()
PATHS = ["gather", *(["kernel"] if KERNEL is not None else [])]


def filled_cache(
    lens: list[list[int]], block_size: int, seed: int
) -> tuple[PagedKVCache, list, torch.Tensor]:
    """One layer, a sequence per row of `lens` (tokens per kv-head), random keys and values.

    Tokens are written in chunks of random size, as prefill and decode do, so bounds are folded
    in over several writes. Returns the cache, the sequences and this step's queries `(N, H_q, D)`.
    """
    gen = torch.Generator().manual_seed(seed)
    pool = BlockPool(512, block_size, D)
    pool.track_key_bounds()
    cache = PagedKVCache(pool, num_layers=1, num_kv_heads=H_KV)
    seqs = []
    for cell_lens in lens:
        seq = cache.new_sequence()
        longest = max(cell_lens)
        done = 0
        while done < longest:
            n = min(longest - done, int(torch.randint(1, 9, (), generator=gen)))
            slots = cache.append(seq, n).flatten()
            pool.write(
                slots,
                torch.randn(slots.numel(), D, generator=gen) * 3,
                torch.randn(slots.numel(), D, generator=gen),
            )
            done += n
        keep = [torch.arange(n) for n in cell_lens]  # per-head lengths, as a press leaves them
        cache.retain(seq, 0, keep)
        seqs.append(seq)
    q = torch.randn(len(lens), H_KV * GROUP, D, generator=gen)
    return cache, seqs, q


def context(cache: PagedKVCache, seqs: list, selection: BlockSelection | None, path: str) -> ForwardContext:
    spans = [SeqSpan(i, i + 1, seq, int(seq.max_len)) for i, seq in enumerate(seqs)]
    batch = decode_batch(spans, cache.pool.zero_slot, with_positions=False)
    kernel = KERNEL if path == "kernel" else None
    return ForwardContext(cache.pool, spans, torch.empty(0), batch, kernel, selection, SelectionStats())


def reference_block_scores(keys: torch.Tensor, q: torch.Tensor, bs: int, heads: str) -> list[float]:
    """float64 score of every block of one cell from its keys `(n, D)`, for its query heads q `(G, D)`.

    Per head, Quest's bound `sum_d max(q_d * min_d, q_d * max_d)`; "sum" adds the heads' bounds,
    "max" takes each head's bound minus its best over the cell's blocks, the largest over heads,
    "mass" each head's softmax over the blocks of its bounds times 1/sqrt(D), summed over heads.
    """
    qd, keys = q.double(), keys.double()
    per = []  # per[j][g]
    for j in range(-(-keys.shape[0] // bs)):
        block = keys[j * bs : (j + 1) * bs]
        lo, hi = block.min(0).values, block.max(0).values
        per.append([float(torch.maximum(qh * lo, qh * hi).sum()) for qh in qd])
    if heads == "sum":
        return [sum(row) for row in per]
    best = [max(row[g] for row in per) for g in range(qd.shape[0])]
    if heads == "max":
        return [max(row[g] - best[g] for g in range(qd.shape[0])) for row in per]
    scale = qd.shape[1] ** -0.5
    totals = [sum(math.exp(scale * (row[g] - best[g])) for row in per) for g in range(qd.shape[0])]
    return [sum(math.exp(scale * (row[g] - best[g])) / totals[g] for g in range(qd.shape[0])) for row in per]


def brute_force_blocks(
    cache: PagedKVCache, seq, head: int, q: torch.Tensor, sel: BlockSelection
) -> list[int]:
    """Cell block indices the selection must read: sinks, recent, then the best brute-force scores."""
    bs, n = cache.block_size, int(seq.lens[0, head])
    keys = cache.pool.k[seq.slots[0, head, :n]]  # (n, D)
    num_blocks = -(-n // bs)
    k = sel.blocks_to_read(max(-(-int(length) // bs) for length in seq.lens[0]))
    return reference_pick(reference_block_scores(keys, q, bs, sel.heads), num_blocks, k, sel)


def reference_pick(scores: list[float], num_blocks: int, k: int, sel: BlockSelection) -> list[int]:
    """Sinks and recent blocks, then the best scores (ties: the earlier block), each sink and pick
    bringing its next `sel.neighbours` blocks, until `k` blocks: the cell's block indices, ascending."""
    chosen = {j for j in range(num_blocks) if j < sel.sink_blocks or j >= num_blocks - sel.recent_blocks}
    rest = sorted(set(range(num_blocks)) - chosen, key=lambda j: -scores[j])  # stable: ties by index
    starts = [*range(min(sel.sink_blocks, num_blocks)), *rest] if sel.neighbours else rest
    for first in starts:
        for j in range(first, min(first + sel.neighbours + 1, num_blocks)):
            if len(chosen) < k:
                chosen.add(j)
    return sorted(chosen)


@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.integers(1, 60), min_size=H_KV, max_size=H_KV),
    block_size=st.sampled_from([1, 4, 8]),
    seed=st.integers(0, 10_000),
)
def test_the_upper_bound_bounds_every_key_of_its_block(lens: list[int], block_size: int, seed: int) -> None:
    cache, (seq,), q = filled_cache([lens], block_size, seed)
    bounds = cache.pool.key_bounds
    assert bounds is not None
    for head in range(H_KV):
        n = lens[head]
        slots = seq.slots[0, head, :n]
        blocks = seq.block_table[0, head, : -(-n // block_size)]
        keys = cache.pool.k[slots]
        # The bounds are exactly the per-channel min and max of what the block holds.
        for j, block in enumerate(blocks.tolist()):
            held = keys[j * block_size : (j + 1) * block_size]
            assert torch.equal(bounds.min[block], held.min(0).values)
            assert torch.equal(bounds.max[block], held.max(0).values)
        qg = q[0, head * GROUP : (head + 1) * GROUP]  # (G, D)
        ub = bounds.upper_bound(qg, blocks)  # (G, B)
        scores = (qg.double() @ keys.double().T).view(GROUP, -1)  # (G, n)
        for j in range(blocks.numel()):
            best = scores[:, j * block_size : (j + 1) * block_size].amax(-1)
            assert bool((best <= ub[:, j].double() + 1e-4).all())


@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.lists(st.integers(1, 80), min_size=H_KV, max_size=H_KV), min_size=1, max_size=3),
    budget=st.integers(3, 9),
    sink=st.integers(0, 2),
    recent=st.integers(1, 2),
    seed=st.integers(0, 10_000),
    heads=st.sampled_from(HEAD_SCORES),
    neighbours=st.integers(0, 2),
)
def test_selection_reads_sinks_recent_and_the_best_bounds(
    lens: list[list[int]], budget: int, sink: int, recent: int, seed: int, heads: str, neighbours: int
) -> None:
    bs = 4
    sel = BlockSelection(
        budget=max(budget, sink + recent), sink_blocks=sink, recent_blocks=recent, heads=heads,
        neighbours=neighbours,
    )  # fmt: skip
    cache, seqs, q = filled_cache(lens, bs, seed)
    ctx = context(cache, seqs, sel, "gather")
    assert ctx.decode is not None and cache.pool.key_bounds is not None
    slots, new_lens, _, read, held = select_blocks(
        sel, cache.pool.key_bounds, q, ctx.decode.slots[0], ctx.decode.lens[0], cache.pool.zero_slot
    )
    total_read = 0
    for i, seq in enumerate(seqs):
        for h in range(H_KV):
            n = int(seq.lens[0, h])
            expected = brute_force_blocks(cache, seq, h, q[i, h * GROUP : (h + 1) * GROUP], sel)
            num_blocks = -(-n // bs)
            assert {j for j in range(num_blocks) if j < sink or j >= num_blocks - recent} <= set(expected)
            cell = seq.slots[0, h, :n]
            want = torch.cat([cell[j * bs : (j + 1) * bs] for j in expected])
            m = int(new_lens[i, h])
            assert torch.equal(slots[i, h, :m], want), "the chosen blocks' tokens, in cache order"
            assert bool((slots[i, h, m:] == cache.pool.zero_slot).all())
            total_read += len(expected)
    assert int(read) == total_read
    assert int(held) == sum(-(-n // bs) for row in lens for n in row)


def dense_over(
    cache: PagedKVCache, slots_per_head: list[list[torch.Tensor]], q: torch.Tensor
) -> torch.Tensor:
    """float64 softmax attention of q `(N, H_q, D)` over the given slots of each (sequence, kv-head)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, heads in enumerate(slots_per_head):
        for h, slots in enumerate(heads):
            k, v = cache.pool.k[slots].double(), cache.pool.v[slots].double()
            for g in range(GROUP):
                qh = q[i, h * GROUP + g].double()
                out[i, h * GROUP + g] = torch.softmax(k @ qh * D**-0.5, 0) @ v
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("budget", [3, 5, 100])
@pytest.mark.parametrize("heads", HEAD_SCORES)
def test_selected_attention_is_dense_attention_over_the_chosen_blocks(
    path: str, budget: int, heads: str
) -> None:
    """budget 100 covers every block: the result is plain dense attention over the whole cache."""
    lens = [[37, 20], [9, 45]]
    sel = BlockSelection(budget=budget, sink_blocks=1, recent_blocks=2, heads=heads)
    cache, seqs, q = filled_cache(lens, 4, seed=5)
    ctx = context(cache, seqs, sel, path)
    assert ctx.decode is not None
    out = _decode(ctx, ctx.decode, 0, q, D**-0.5, None)
    chosen = []
    for i, seq in enumerate(seqs):
        heads = []
        for h in range(H_KV):
            blocks = brute_force_blocks(cache, seq, h, q[i, h * GROUP : (h + 1) * GROUP], sel)
            cell = seq.slots[0, h, : int(seq.lens[0, h])]
            heads.append(torch.cat([cell[j * 4 : (j + 1) * 4] for j in blocks]))
        chosen.append(heads)
    torch.testing.assert_close(out.double(), dense_over(cache, chosen, q), atol=1e-5, rtol=1e-5)
    if budget == 100:
        full = [[seq.slots[0, h, : int(seq.lens[0, h])] for h in range(H_KV)] for seq in seqs]
        torch.testing.assert_close(out.double(), dense_over(cache, full, q), atol=1e-5, rtol=1e-5)
    assert ctx.selection_stats is not None
    assert ctx.selection_stats.read_fraction == (
        1.0
        if budget == 100
        else pytest.approx(
            sum(min(budget, -(-n // 4)) for row in lens for n in row)
            / sum(-(-n // 4) for row in lens for n in row)
        )
    )


def test_bounds_forget_a_freed_block() -> None:
    pool = BlockPool(4, 2, D)
    bounds = pool.track_key_bounds()
    ids = pool.allocate(4)
    pool.write(torch.arange(8), torch.full((8, D), 100.0), torch.zeros(8, D))
    pool.release(ids)
    (block,) = pool.allocate(1).tolist()
    pool.write(torch.tensor([2 * block]), -torch.ones(1, D), torch.zeros(1, D))
    assert bool((bounds.max[block] == -1).all()) and bool((bounds.min[block] == -1).all())


def test_engine_with_a_budget_covering_everything_matches_transformers(tiny_llama: LoadedModel) -> None:
    prompt = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    engine = Engine(tiny_llama, CacheConfig(block_size=4, max_kv_bytes=2**22))
    engine.runner.select_blocks(BlockSelection(fraction=1.0))
    seq = engine.add_request(prompt, SamplingParams(max_tokens=10, ignore_eos=True))
    engine.run()
    assert engine.sequences[seq].output_ids == hf_greedy(tiny_llama, prompt, 10)
    assert engine.runner.selection_stats.read_fraction == 1.0


def test_engine_reads_a_fraction_of_the_blocks(tiny_llama: LoadedModel) -> None:
    prompt = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    engine = Engine(tiny_llama, CacheConfig(block_size=4, max_kv_bytes=2**22))
    engine.runner.select_blocks(make_method("quest", 0.8, recent_blocks=1).selection)
    seq = engine.add_request(prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    engine.run()
    assert len(engine.sequences[seq].output_ids) == 6
    # 50-52 blocks per cell while decoding: ceil(0.2 * 51) = 11 of 51 read.
    assert 0.19 < engine.runner.selection_stats.read_fraction < 0.23


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(InvalidRequestError, match="budget of 2 blocks is below the 3"):
        BlockSelection(budget=2, sink_blocks=1, recent_blocks=2)
    with pytest.raises(InvalidRequestError, match="recent_blocks must be >= 1"):
        BlockSelection(budget=4, recent_blocks=0)
    with pytest.raises(InvalidRequestError, match="one of budget"):
        BlockSelection()
    with pytest.raises(InvalidRequestError, match="sink_blocks must be an integer"):
        make_method("quest", 0.5, sink_blocks=-1)
    with pytest.raises(InvalidRequestError, match="heads must be one of 'sum', 'max', 'mass', got 'mean'"):
        make_method("quest", 0.5, heads="mean")
    with pytest.raises(InvalidRequestError, match="neighbours must be an integer >= 0, got -1"):
        make_method("quest", 0.5, neighbours=-1)
    with pytest.raises(InvalidRequestError, match="compression ratio"):
        make_method("quest", 1.0)
    with pytest.raises(
        InvalidRequestError, match=r"unknown press 'qwest' \(nor method\).*known methods: duo, quest"
    ):
        method_or_press("qwest", 0.5)
    pool = BlockPool(4, 2, D)
    pool.allocate(1)
    with pytest.raises(ValueError, match="empty pool"):
        pool.track_key_bounds()


def test_eval_measures_quest_from_the_shared_prefill(tiny_llama: LoadedModel) -> None:
    """quest at ratio 0 reads every block: the same answers as the full cache; at 0.8 fewer blocks."""
    from kvengine.eval.measure import measure

    class Bytes:
        chat_template = None
        eos_token_id = None

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return " ".join(map(str, ids))

    model = dataclasses.replace(tiny_llama, tokenizer=Bytes())
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(6)).tolist()
    rests = [[1, 2, 3], [4, 5]]
    settings = [("none", 0.0, 0), ("quest", 0.0, 0), ("quest", 0.8, 0)]
    full, everything, selected = measure(model, ids, rests, settings, max_new_tokens=5)
    assert everything.outputs == full.outputs and everything.blocks_read == 1.0
    assert selected.blocks_read is not None and selected.blocks_read < 0.3
    # The whole cache is held, plus one bounds row pair per block (1/block_size of it).
    assert everything.kv_bytes == pytest.approx(full.kv_bytes * (1 + 1 / 16))


def test_the_cache_config_turns_quest_on(tiny_llama: LoadedModel) -> None:
    """`CacheConfig(select_blocks=...)`: everything read equals transformers; a fraction reads that share."""
    prompt = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    whole = Engine(tiny_llama, CacheConfig(block_size=4, max_kv_bytes=2**22, select_blocks=1.0))
    assert whole.generate([prompt], params)[0].output_ids == hf_greedy(tiny_llama, prompt, 6)
    part = Engine(tiny_llama, CacheConfig(block_size=4, max_kv_bytes=2**22, select_blocks=0.25))
    assert len(part.generate([prompt], params)[0].output_ids) == 6
    assert 0.24 < part.runner.selection_stats.read_fraction < 0.30  # ceil(0.25 * ~51) of ~51 blocks
    for bad, message in (
        (dict(select_blocks=1.5), "select_blocks must be in"),
        (dict(select_blocks=0.5, kv_bits=4), "packed blocks"),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            CacheConfig(**bad)  # type: ignore[arg-type]
