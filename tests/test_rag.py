"""Chunk reuse (kvengine.rag) against references: plain prefill, keys computed at the new position."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError, UnsupportedModelError
from kvengine.eval.tasks.haystack import prose_path
from kvengine.models import LoadedModel
from kvengine.rag import BlendConfig, RagPrompt, build_rag_prompt, check_spans, rag_generate
from kvengine.rag.blend import Piece, assemble, place
from kvengine.rag.chunks import ChunkStore
from kvengine.rag.dense import prefill_layers
from kvengine.rag.rotation import check_rerotatable, rerotate
from kvengine.rag.spans import parse_kv_chunks
from kvengine.rag.workload import build_documents, build_questions

ROPE_FAMILIES = ["llama", "qwen2", "qwen3"]


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(model: LoadedModel, **kw: object) -> Engine:
    return Engine(model, CacheConfig(prefix_cache=True, block_size=4, **kw))  # type: ignore[arg-type]


PROMPT = RagPrompt(_ids(64), ((5, 23), (23, 42), (45, 60)))


@pytest.mark.parametrize("family", ROPE_FAMILIES)
@pytest.mark.parametrize("delta", [1, 17, 300])
def test_rerotated_keys_equal_keys_computed_at_the_new_position(family: str, delta: int) -> None:
    model = tiny_model(family)
    ids = torch.tensor(_ids(20))
    k0, _ = prefill_layers(model, ids, torch.arange(20))
    kd, _ = prefill_layers(model, ids, torch.arange(20) + delta)
    assert not torch.allclose(k0, kd, atol=1e-3)  # the position matters
    for layer in range(model.num_layers):
        moved = rerotate(k0[layer], delta, model.adapter.rope(model.hf_model, layer))
        torch.testing.assert_close(moved, kd[layer], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_full_recompute_assembly_equals_dense_prefill(family: str) -> None:
    """Chunks cached at position 0, placed anywhere, 100% recomputed: the cache of a plain prefill."""
    model = tiny_model(family)
    ids = PROMPT.token_ids[:60]
    pieces = []
    for start, end in ((0, 5), *PROMPT.spans):
        k, v = prefill_layers(model, torch.tensor(ids[start:end]), torch.arange(end - start))
        pieces.append(Piece(start, k, v))
    made = assemble(model, ids, pieces, BlendConfig("blend", 1.0))
    ref_k, ref_v = prefill_layers(model, torch.tensor(ids), torch.arange(len(ids)))
    torch.testing.assert_close(made.keys, ref_k, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(made.values, ref_v, atol=1e-5, rtol=1e-4)
    reused = assemble(model, ids, pieces, BlendConfig("reuse"))
    assert not torch.allclose(reused.keys[1:], ref_k[1:], atol=1e-3)  # no recompute: chunks missed each other


def _first_logprobs(engine: Engine, prompt: RagPrompt, blend: BlendConfig) -> tuple[list[int], list[float]]:
    out = rag_generate(engine, prompt, SamplingParams(max_tokens=4, logprobs=5), blend=blend).output
    assert out.logprobs is not None
    return out.output_ids, [lp.logprob for lp in out.logprobs] + [x for lp in out.logprobs for _, x in lp.top]


@pytest.mark.parametrize("spans", [((0, 24),), PROMPT.spans])
def test_chunks_recomputed_in_full_give_the_logits_of_a_plain_prefill(tiny_llama: LoadedModel, spans) -> None:
    """Through the engine: a chunk at offset 0 (and chunks elsewhere), 100% recompute, vs a plain prefill."""
    prompt = RagPrompt(PROMPT.token_ids, spans)
    ref_ids, ref = _first_logprobs(Engine(tiny_llama), prompt, BlendConfig("full"))
    engine = _engine(tiny_llama)
    ids, got = _first_logprobs(engine, prompt, BlendConfig("blend", 1.0))
    assert ids == ref_ids
    assert got == pytest.approx(ref, abs=1e-4)
    engine.check_invariants()


def test_modes_recompute_what_they_say(tiny_llama: LoadedModel) -> None:
    engine = _engine(tiny_llama)
    moved = [end - start for start, end in PROMPT.spans]  # every chunk starts past 0: all are moved
    uncovered = PROMPT.spans[-1][1] - sum(moved) - 4  # the head's 5 tokens: 4 in whole blocks
    uncovered += sum(n % 4 for n in moved)  # each chunk's partial last block is not kept
    reuse = rag_generate(engine, PROMPT, SamplingParams(max_tokens=2), blend=BlendConfig("reuse"))
    assert reuse.num_recomputed_tokens == uncovered
    assert reuse.num_chunks_computed == 4  # three chunks and the head, computed once
    for ratio in (0.05, 0.15, 0.3):
        res = rag_generate(engine, PROMPT, SamplingParams(max_tokens=2), blend=BlendConfig("blend", ratio))
        chosen = sum(math.ceil(ratio * (n - n % 4)) for n in moved)
        assert uncovered < res.num_recomputed_tokens <= uncovered + chosen
        assert res.num_chunks_computed == 0  # all read from the store
    engine.check_invariants()
    assert engine.pool.num_used_blocks == engine.prefix.num_evictable_blocks  # type: ignore[union-attr]


def test_no_chunk_crosses_a_tenant(tiny_llama: LoadedModel) -> None:
    engine = _engine(tiny_llama)
    store = ChunkStore(engine)
    chunk = PROMPT.chunk(0)
    first = rag_generate(
        engine, PROMPT, SamplingParams(max_tokens=2), blend=BlendConfig("reuse"), cache_salt="a"
    )
    assert first.num_chunks_computed == 4
    assert store.fetch(chunk, "a").num_tokens == 16
    assert store.fetch(chunk, "b").num_tokens == 0  # tenant b sees nothing of a's
    again = rag_generate(
        engine, PROMPT, SamplingParams(max_tokens=2), blend=BlendConfig("reuse"), cache_salt="a"
    )
    assert again.num_chunks_computed == 0
    other = rag_generate(
        engine, PROMPT, SamplingParams(max_tokens=2), blend=BlendConfig("reuse"), cache_salt="b"
    )
    assert other.num_chunks_computed == 4  # computed again, under b's salt
    assert other.output.output_ids == again.output.output_ids
    engine.check_invariants()


@pytest.mark.parametrize(
    ("spans", "match"),
    [
        (((5, 23), (20, 40)), "overlap"),
        (((5, 23), (30, 64)), "at least one prompt token must follow"),
        (((5, 70),), "not a span"),
        (((-1, 3),), "not a span"),
        (((5,),), r"\[start, end\]"),
    ],
)
def test_bad_spans_are_refused_and_nothing_is_cached(tiny_llama: LoadedModel, spans, match: str) -> None:
    engine = _engine(tiny_llama)
    with pytest.raises(InvalidRequestError, match=match):
        rag_generate(engine, RagPrompt(PROMPT.token_ids, spans), blend=BlendConfig("reuse"))
    assert engine.pool.num_used_blocks == 0 and not engine.sequences


def test_a_chunk_longer_than_the_context_is_refused(tiny_llama: LoadedModel) -> None:
    engine = _engine(tiny_llama)
    ids = _ids(1100)
    with pytest.raises(InvalidRequestError, match="model's context is 1024"):
        rag_generate(engine, RagPrompt(ids, ((2, 1050),)), blend=BlendConfig("reuse"))
    assert engine.pool.num_used_blocks == 0


@pytest.mark.parametrize(
    ("family", "overrides", "match"),
    [
        ("mistral", {}, "sliding-window"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}}, "yarn"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
            "dynamic",
        ),
    ],
)
def test_models_whose_keys_do_not_move_by_a_rotation_are_refused(
    family: str, overrides: dict, match: str
) -> None:
    model = tiny_model(family, **overrides)
    with pytest.raises(UnsupportedModelError, match=match):
        check_rerotatable(model)
    engine = _engine(model)
    with pytest.raises(UnsupportedModelError, match=match):
        rag_generate(engine, PROMPT, blend=BlendConfig("blend"))
    assert engine.pool.num_used_blocks == 0


def test_settings_are_checked() -> None:
    with pytest.raises(InvalidRequestError, match="known: full, reuse, blend"):
        BlendConfig("cacheblend")
    with pytest.raises(InvalidRequestError, match="recompute_ratio"):
        BlendConfig("blend", 1.5)
    with pytest.raises(InvalidRequestError, match="prefix_cache"):
        rag_generate(Engine(tiny_model("llama")), PROMPT, blend=BlendConfig("reuse"))


def test_add_kv_context_refuses_a_cache_of_other_tokens(tiny_llama: LoadedModel) -> None:
    engine = _engine(tiny_llama)
    kv = engine.cache.new_sequence()
    engine.cache.append(kv, 8)
    with pytest.raises(InvalidRequestError, match=r"positions 0\.\.9"):
        engine.add_kv_context(_ids(10), kv)
    engine.cache.free(kv)
    assert engine.pool.num_used_blocks == 0


class _Chars:
    """A tokenizer stub: one token per character (enough to check spans and lengths)."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 256 for c in text]


def test_build_rag_prompt_spans_are_the_documents_tokenized_alone() -> None:
    docs = ["first document.", "a second one", "third"]
    prompt = build_rag_prompt(_Chars(), docs, "Which?")
    assert [prompt.chunk(i) for i in range(3)] == [_Chars().encode(d) for d in docs]
    assert check_spans(prompt.spans, len(prompt.token_ids), 1024) == prompt.spans
    with pytest.raises(InvalidRequestError, match="at least one document"):
        build_rag_prompt(_Chars(), [], "Which?")


def test_parse_kv_chunks_names_the_field() -> None:
    assert parse_kv_chunks([[4, 9], [0, 3]], 12, 1024) == ((0, 3), (4, 9))
    for bad in ([], "0,3", None, [[0, 3, 5]], [[True, 3]]):
        with pytest.raises(InvalidRequestError, match="kv_chunks"):
            parse_kv_chunks(bad, 12, 1024)


def _has_prose() -> bool:
    try:
        prose_path()
    except InvalidRequestError:
        return False
    return True


@pytest.mark.skipif(not _has_prose(), reason="the prose haystack package (eval extra) is not installed")
def test_workload_documents_and_questions() -> None:
    docs = build_documents(_Chars(), num_documents=6, min_tokens=300, max_tokens=400, seed=3)
    assert all(300 - 40 <= d.num_tokens <= 400 for d in docs)  # fit stops at a word boundary below the target
    assert len({d.code for d in docs}) == len({d.name for d in docs}) == 6
    for d in docs:
        assert f"The access code of the {d.name} room is {d.code}." in d.text
        assert sum(c.isdigit() for c in d.text) == 4  # the code is the only number in the prose
    for q in build_questions(docs, 10, 4, 6, seed=3):
        assert 4 <= len(set(q.documents)) == len(q.documents) <= 6 and q.target in q.documents
        assert q.is_correct(f"It is {docs[q.target].code}.") and not q.is_correct("It is 123.")


@pytest.mark.parametrize(
    "blend",
    [
        BlendConfig("reuse", sink_tokens=10_000),
        BlendConfig("blend", 1.0, anchor="head"),
        BlendConfig("blend", 1.0, sink_tokens=3, anchor="head"),
        BlendConfig("reuse", sink_tokens=10_000, anchor="head"),
    ],
)
def test_sinks_and_anchors_with_every_token_recomputed_give_a_plain_prefill(
    tiny_llama: LoadedModel, blend: BlendConfig
) -> None:
    ref_ids, ref = _first_logprobs(Engine(tiny_llama), PROMPT, BlendConfig("full"))
    engine = _engine(tiny_llama)
    ids, got = _first_logprobs(engine, PROMPT, blend)
    assert ids == ref_ids
    assert got == pytest.approx(ref, abs=1e-4)
    engine.check_invariants()


def test_a_chunk_anchored_on_the_head_and_placed_after_it_is_exact(tiny_llama: LoadedModel) -> None:
    """No recompute: the chunk computed after the head is the plain prefill's cache there; one at 0 is not."""
    prompt = RagPrompt(PROMPT.token_ids, ((5, 40),))
    ref_ids, ref = _first_logprobs(Engine(tiny_llama), prompt, BlendConfig("full"))
    engine = _engine(tiny_llama)
    anchored = rag_generate(
        engine, prompt, SamplingParams(max_tokens=1), blend=BlendConfig("reuse", anchor="head")
    )
    assert anchored.num_recomputed_tokens == 0  # head + chunk, kept as one prefix, fill 10 whole blocks
    assert anchored.num_chunks_computed == 1
    ids, got = _first_logprobs(engine, prompt, BlendConfig("reuse", anchor="head"))
    assert ids == ref_ids and got == pytest.approx(ref, abs=1e-4)
    _, alone = _first_logprobs(engine, prompt, BlendConfig("reuse"))
    assert alone != pytest.approx(ref, abs=1e-3)  # computed at position 0, the chunk missed the head


def test_sink_tokens_recompute_each_moved_chunks_first_tokens(tiny_llama: LoadedModel) -> None:
    engine = _engine(tiny_llama)
    params = SamplingParams(max_tokens=1)
    base = rag_generate(engine, PROMPT, params, blend=BlendConfig("reuse")).num_recomputed_tokens
    sinks = rag_generate(engine, PROMPT, params, blend=BlendConfig("reuse", sink_tokens=3))
    assert sinks.num_recomputed_tokens == base + 3 * len(PROMPT.spans)  # every chunk moved from position 0
    head = rag_generate(engine, PROMPT, params, blend=BlendConfig("reuse", anchor="head"))
    head_sinks = rag_generate(
        engine, PROMPT, params, blend=BlendConfig("reuse", sink_tokens=3, anchor="head")
    )
    assert (
        head_sinks.num_recomputed_tokens == head.num_recomputed_tokens + 3 * 2
    )  # the first chunk is in place
    with_blend = rag_generate(engine, PROMPT, params, blend=BlendConfig("blend", 0.15, sink_tokens=3))
    plain_blend = rag_generate(engine, PROMPT, params, blend=BlendConfig("blend", 0.15))
    assert (
        plain_blend.num_recomputed_tokens
        < with_blend.num_recomputed_tokens
        <= plain_blend.num_recomputed_tokens + 9
    )
    engine.check_invariants()


def test_blend_settings_name_what_is_wrong() -> None:
    for bad in (-1, True, "8", 1.5):
        with pytest.raises(InvalidRequestError, match="sink_tokens must be an integer >= 0"):
            BlendConfig("reuse", sink_tokens=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="unknown anchor 'tail'; known: none, head"):
        BlendConfig("blend", anchor="tail")


def test_bench_systems_parse_and_refuse_clearly() -> None:
    from kvengine.bench.rag import parse_system, systems

    assert parse_system("full") == ("plain", BlendConfig("full"))
    assert parse_system("prefix") == ("prefix", BlendConfig("full"))
    assert parse_system("reuse+sink16") == ("chunks", BlendConfig("reuse", sink_tokens=16))
    assert parse_system("blend-15+head+sink8") == (
        "chunks",
        BlendConfig("blend", 0.15, sink_tokens=8, anchor="head"),
    )
    assert list(systems([0.05, 0.3])) == ["full", "prefix", "reuse", "blend-5", "blend-30"]
    for bad in ("blend", "blend-150", "reuse+tail", "full+head", "blend-15+sink", "reuse+head+head", "lego"):
        with pytest.raises(InvalidRequestError, match="known forms: full, prefix"):
            parse_system(bad)


@pytest.mark.parametrize(("origin", "start"), [(7, 30), (12, 12), (40, 9)])
def test_a_piece_computed_at_an_origin_is_rerotated_by_start_minus_origin(origin: int, start: int) -> None:
    """Keys computed at positions origin.. and placed at start.. equal keys computed at start.. (all layers)."""
    model = tiny_model("llama")
    ids = torch.tensor(_ids(20, seed=5))
    k_origin, v_origin = prefill_layers(model, ids, torch.arange(20) + origin)
    k_start, v_start = prefill_layers(model, ids, torch.arange(20) + start)
    keys, values, covered = place(model, [Piece(start, k_origin, v_origin, origin=origin)], start + 25)
    torch.testing.assert_close(keys[:, :, start : start + 20], k_start, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(values[:, :, start : start + 20], v_start, atol=2e-5, rtol=1e-4)
    assert covered.nonzero().flatten().tolist() == list(range(start, start + 20))


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_prefill_layers_after_a_known_prefix_equals_computing_it_all(family: str) -> None:
    model = tiny_model(family)
    ids = torch.tensor(_ids(40, seed=6))
    ref_k, ref_v = prefill_layers(model, ids, torch.arange(40), 2)
    known = (ref_k[:, :, :17].clone(), ref_v[:, :, :17].clone())
    got_k, got_v = prefill_layers(model, ids, torch.arange(40), 2, known)
    torch.testing.assert_close(got_k, ref_k, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_v, ref_v, atol=1e-5, rtol=1e-4)
    wrong = (torch.zeros_like(known[0]), torch.zeros_like(known[1]))
    assert not torch.allclose(
        prefill_layers(model, ids, torch.arange(40), 2, wrong)[0][1, :, 17:], ref_k[1, :, 17:]
    )
