"""Embedders against references (the model's own hidden states and input embeddings), and the
`bench semantic` command end to end on the model-free embedder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

from kvengine.cli import main
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.semantic.embedder import EMBEDDERS, HiddenStateEmbedder, make_embedder


class ByteTokenizer:
    """Token ids are a text's UTF-8 bytes (the tiny models have a 256-token vocabulary)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())


def _tiny_with_tokenizer(family: str = "llama") -> LoadedModel:
    model = tiny_model(family)
    model.tokenizer = ByteTokenizer()  # type: ignore[assignment]
    return model


def _reference(model: LoadedModel, texts: list[str], layer: int | None) -> np.ndarray:
    """Mean over tokens 1.. of the full model's normed hidden states (or input embeddings), centred, unit."""
    from kvengine.semantic.embedder import _REFERENCE

    def pooled(text: str) -> np.ndarray:
        ids = torch.tensor([list(text.encode())])
        with torch.no_grad():
            if layer is None:
                states = model.hf_model.get_input_embeddings()(ids)[0]
            else:
                states = model.hf_model(ids, output_hidden_states=True).hidden_states[layer]
                states = model.hf_model.model.norm(states)[0]  # the twin's last layer is its last: normed
        return states[1:].double().mean(0).numpy()

    centre = np.mean([pooled(t) for t in _REFERENCE], axis=0)
    rows = np.stack([pooled(t) - centre for t in texts])
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_hidden_state_embedder_matches_the_full_model(family: str) -> None:
    model = _tiny_with_tokenizer(family)
    attn_before = model.hf_model.config._attn_implementation
    emb = HiddenStateEmbedder(model, layer=2)
    texts = ["What is the capital of France?", "Which city is the capital of France?", "Convert 5 miles."]
    got = emb.embed(texts)
    np.testing.assert_allclose(got, _reference(model, texts, layer=2), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # The twin shares the model's tensors (no copy) and leaves the model's own config alone.
    twin_weight = emb.twin.get_input_embeddings().weight
    assert twin_weight.data_ptr() == model.hf_model.get_input_embeddings().weight.data_ptr()
    assert len(emb.twin.model.layers) == 2
    assert model.hf_model.config._attn_implementation == attn_before
    assert not any(p.is_meta for p in emb.twin.parameters())
    assert not any(b.is_meta for b in emb.twin.buffers())


def test_static_embedder_matches_the_embedding_table() -> None:
    model = _tiny_with_tokenizer()
    texts = ["hello there", "general kenobi"]
    got = make_embedder("model-static", model).embed(texts)
    np.testing.assert_allclose(got, _reference(model, texts, layer=None), atol=1e-5)


def test_embedders_are_deterministic_and_reject_bad_models() -> None:
    assert list(EMBEDDERS) == ["hashed-ngrams", "model-static", "model-hidden"]
    emb = make_embedder("hashed-ngrams")
    a = emb.embed(["What is 5 squared?", "what is 5 squared", ""])
    assert np.allclose(a, emb.embed(["What is 5 squared?", "what is 5 squared", ""]))
    assert float(a[0] @ a[1]) == pytest.approx(1.0)  # case and punctuation are not features
    assert not a[2].any()  # no features, zero vector
    with pytest.raises(InvalidRequestError, match="needs a model with a tokenizer"):
        make_embedder("model-static", tiny_model())
    with pytest.raises(InvalidRequestError, match="layer must be in \\[1, 3\\]"):
        HiddenStateEmbedder(_tiny_with_tokenizer(), layer=4)


def test_bench_semantic_command(tmp_path: Path) -> None:
    out, report = tmp_path / "rows.jsonl", tmp_path / "report.md"
    args = ["bench", "semantic", "--embedders", "hashed-ngrams", "--bounds", "0.05,0.2", "--pairs", "60",
            "--prompts", "150", "--keys", "30", "--streams", "2", "--out", str(out), "--report", str(report)]  # fmt: skip
    main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [r for r in rows if r["metric"] == "error_among_hits"]
    assert {(r["config"]["policy"], r["config"]["max_error"]) for r in errors} == {
        (p, b) for p in ("vcache", "global") for b in (0.05, 0.2)
    }
    for r in errors:
        c = r["config"]
        assert c["lookups"] == 300 and 0 <= c["wrong_hits"] <= c["hits"] <= c["lookups"]
        low, high = c["ci95"]
        assert low <= r["value"] <= high
        assert c["within_bound"] == (low <= c["max_error"])
    text = report.read_text()
    assert "error among hits [95% CI]" in text and "`kvengine bench semantic" in text


def test_bench_semantic_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (
        ["--bounds", "0,0.1"],
        ["--bounds", "1.5"],
        ["--embedders", "glove"],
        ["--policies", "fixed"],
    ):
        try:
            code = main(["bench", "semantic", "--out", "/dev/null", "--report", "/dev/null", *bad])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        assert code == 2
    err = capsys.readouterr().err
    assert "error bounds must be in (0, 1)" in err
    assert "known embedders: hashed-ngrams, model-static, model-hidden" in err
    assert "known threshold policies: global, vcache" in err
