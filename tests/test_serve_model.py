"""What `kvengine serve` loads and says it serves: .gguf paths, the startup line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.models import LoadedModel, convert, load, registry
from kvengine.server.serve import startup_line


@pytest.mark.model
def test_the_bundled_gguf_path_loads_the_bundled_model(
    bundled: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = registry.locate_gguf(registry.BUNDLED["smollm2-135m"])

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "convert_gguf", no_conversion)  # shares the bundled model's conversion
    model = load(str(path), dtype="float32", progress=False)
    assert model.name == str(path)
    for (name, a), (_, b) in zip(
        model.hf_model.state_dict().items(), bundled.hf_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_another_gguf_file_is_converted_once_per_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvengine.models import _ensure_converted_gguf

    converted: list[Path] = []

    def fake_convert(gguf: Path, model_dir: Path, progress: bool = True) -> None:
        converted.append(model_dir)
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text("{}")

    monkeypatch.setattr(convert, "convert_gguf", fake_convert)
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(b"v1")
    first = _ensure_converted_gguf(gguf, tmp_path / "cache", progress=False)
    assert _ensure_converted_gguf(gguf, tmp_path / "cache", progress=False) == first
    gguf.write_bytes(b"version 2")  # a changed file is a new model
    second = _ensure_converted_gguf(gguf, tmp_path / "cache", progress=False)
    assert converted == [first, second] and first != second and "weights" in second.name


def test_startup_line_names_model_dtype_device_pool_and_prefix_cache() -> None:
    model = tiny_model("llama")
    engine = Engine(
        model, CacheConfig(block_size=4, max_kv_bytes=2**22, prefix_cache=True, eviction_policy="lfu")
    )
    line = startup_line(engine, "alias")
    pool = engine.pool
    expected = (
        "tiny-llama as 'alias'",
        "dtype float32",
        "device cpu",
        f"KV pool {pool.capacity_bytes / 2**20:.0f} MiB in {pool.num_blocks} blocks of 4 tokens",
        "prefix cache on, eviction lfu",
    )
    assert all(part in line for part in expected), line
    assert "prefix cache off" in startup_line(
        Engine(model, CacheConfig(block_size=4, max_kv_bytes=2**22)), "m"
    )
