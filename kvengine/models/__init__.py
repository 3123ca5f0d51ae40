"""Loading a model by name: bundled models, local Hugging Face directories, GGUF files, built models.

`load("smollm2-135m")` finds the GGUF file shipped in an installed Python
package, converts it once into `<cache_dir>/models/smollm2-135m/` and loads
that directory afterwards; `load("/path/to/hf_dir")` loads a local HF model
directory as it is; `LoadedModel.from_hf(model)` wraps a model already built
(tests build tiny random ones from a config). Nothing is ever downloaded.

A `LoadedModel` answers the shape questions the cache and engine ask (layers,
kv heads, head dim, sliding windows) through the family's adapter, so no other
module reads model configs directly.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kvengine.config import DEFAULT_MODEL, WEIGHTS_CHOICES, ModelConfig, default_cache_dir
from kvengine.engine.weights import quantize_weights
from kvengine.errors import InvalidRequestError, ModelNotFoundError
from kvengine.models import convert, registry
from kvengine.models.adapters import ADAPTERS, ArchAdapter, adapter_for
from kvengine.models.device import resolve_device
from kvengine.models.own_attention import keep_own_attention
from kvengine.models.precision import resolve_dtype
from kvengine.models.registry import BundledModel, bundled_names

__all__ = [
    "ADAPTERS",
    "ArchAdapter",
    "LoadedModel",
    "adapter_for",
    "bundled_names",
    "describe_bundled",
    "load",
    "load_from_config",
]

# Any one of these files means the directory carries a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer (if any) and adapter."""

    name: str
    hf_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    adapter: ArchAdapter
    dtype_reason: str = "as built"  # why it runs in its dtype (see models.precision)
    weights: str = "model"  # "int8" / "int4": linear layers hold weight-only int8 / int4 (engine/weights.py)

    @classmethod
    def from_hf(
        cls,
        hf_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        name: str = "custom",
    ) -> LoadedModel:
        """Wrap an already-built model; puts it in eval mode with gradients off, in place.

        Device and dtype are left as they are. Raises UnsupportedModelError if
        the model's family has no adapter. The model's own forward passes and
        `generate` keep its attention implementation even after an engine ran
        on it (`own_attention.py`).
        """
        adapter = adapter_for(hf_model.config)
        hf_model.eval()
        hf_model.requires_grad_(False)
        keep_own_attention(hf_model)
        return cls(name=name, hf_model=hf_model, tokenizer=tokenizer, adapter=adapter)

    @property
    def config(self) -> PretrainedConfig:
        return self.hf_model.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        """Query heads per layer."""
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads per layer (fewer than `num_heads` under GQA)."""
        return self.adapter.num_kv_heads(self.config)

    @property
    def head_dim(self) -> int:
        return self.adapter.head_dim(self.config)

    @property
    def max_context_len(self) -> int:
        """Longest sequence the model was trained for (`max_position_embeddings`)."""
        return int(self.config.max_position_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.dtype

    @property
    def device(self) -> torch.device:
        """Where the weights are; the engine puts its KV pool and step tensors there too."""
        return self.hf_model.device

    def sliding_window(self, layer_idx: int) -> int | None:
        """Window of layer `layer_idx` in tokens, or None for full attention."""
        return self.adapter.sliding_window(self.config, layer_idx)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: the generation config's, then the tokenizer's, deduplicated."""
        generation_config = getattr(self.hf_model, "generation_config", None)
        found = _as_ids(getattr(generation_config, "eos_token_id", None))
        if self.tokenizer is not None:
            found += _as_ids(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(found))

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer is not None and bool(getattr(self.tokenizer, "chat_template", None))


def load(
    name_or_path: str = DEFAULT_MODEL,
    *,
    cache_dir: Path | None = None,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "auto",
    weights: str = "model",
    progress: bool = True,
) -> LoadedModel:
    """Load a bundled model by name, a local Hugging Face model directory, or a .gguf file.

    A bundled name is converted into `<cache_dir>/models/<name>/` on first use
    (`cache_dir` defaults to `default_cache_dir()`; `progress` shows a bar over
    that conversion) and loaded from there afterwards; so is a .gguf file (a
    bundled model's own file shares its conversion). A directory holding
    `config.json` is loaded directly. The model comes back on `device`, in
    `dtype`, in eval mode with gradients off. `device` is a torch device or a
    name (`models.device`): "auto", the default, is a CUDA GPU where torch
    sees one and the CPU elsewhere. `dtype` is a torch dtype or a name
    (`models.precision`): "auto", the default, is bfloat16 where the device
    computes it natively and float32 elsewhere; `LoadedModel.dtype_reason`
    says which and why. `weights="int8"` / `"int4"` replaces the linear
    layers by weight-only int8 / int4 ones (groups of 32, `engine/weights.py`; CPU only).

    Raises ModelNotFoundError for an unknown name or a bundled model whose
    package is not installed, UnsupportedModelError for an architecture without
    an adapter, InvalidRequestError for a non-floating-point dtype or a device
    that is unknown or not available here (checked before any weights load).
    """
    device = resolve_device(device)
    if weights not in WEIGHTS_CHOICES:
        raise InvalidRequestError(f"weights must be one of {', '.join(WEIGHTS_CHOICES)}, got {weights!r}")
    if weights != "model" and device.type != "cpu":
        raise InvalidRequestError(f"weights {weights} runs on the CPU only, not on {device}")
    model = _load_any(name_or_path, cache_dir, dtype, device, progress)
    if weights != "model":
        quantize_weights(model.hf_model, bits=int(weights.removeprefix("int")))
        model.weights = weights
    return model


def _load_any(
    name_or_path: str, cache_dir: Path | None, dtype: torch.dtype | str, device: torch.device, progress: bool
) -> LoadedModel:
    """`load()` of the model as it is stored."""
    if isinstance(dtype, str):
        dtype, reason = resolve_dtype(dtype, device)
    else:
        reason = "asked for"
    if not dtype.is_floating_point:
        raise InvalidRequestError(f"dtype must be a floating-point torch dtype, got {dtype}")
    bundled = registry.get_bundled(name_or_path)
    if bundled is not None:
        model_dir = _ensure_converted(bundled, cache_dir or default_cache_dir(), progress)
        return _load_dir(model_dir, bundled.name, dtype, reason, device)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        model_dir = _ensure_converted_gguf(path, cache_dir or default_cache_dir(), progress)
        return _load_dir(model_dir, name_or_path, dtype, reason, device)
    if path.is_dir() and convert.is_converted(path):
        return _load_dir(path, name_or_path, dtype, reason, device)
    if path.is_dir():
        raise ModelNotFoundError(f"{path} has no config.json, so it is not a Hugging Face model directory")
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: bundled models are {', '.join(bundled_names())}; "
        "a path to a local Hugging Face model directory (with config.json) or a .gguf file also works"
    )


def describe_bundled(cache_dir: Path | None = None) -> list[str]:
    """One line per bundled model: name, description, whether it is installed and converted."""
    lines = []
    for name in bundled_names():
        bundled = registry.BUNDLED[name]
        model_dir = convert.converted_dir(cache_dir or default_cache_dir(), name)
        try:
            registry.locate_gguf(bundled)
            state = f"converted in {model_dir}" if convert.is_converted(model_dir) else "not converted yet"
        except ModelNotFoundError:
            state = f"not installed ({bundled.install_command})"
        lines.append(f"{name}: {bundled.description}; {state}")
    return lines


def load_from_config(config: ModelConfig, *, progress: bool = True) -> LoadedModel:
    """`load()` with the name, cache directory, dtype, device and weights of a `ModelConfig`."""
    return load(
        config.name,
        cache_dir=config.cache_dir,
        dtype=config.dtype,
        device=config.device,
        weights=config.weights,
        progress=progress,
    )


def _ensure_converted(bundled: BundledModel, cache_dir: Path, progress: bool) -> Path:
    """The converted directory of `bundled`, converting it first if it is not there yet."""
    model_dir = convert.converted_dir(cache_dir, bundled.name)
    if not convert.is_converted(model_dir):
        gguf_path = registry.locate_gguf(bundled)
        convert.convert_gguf(gguf_path, model_dir, progress=progress)
    return model_dir


def _ensure_converted_gguf(path: Path, cache_dir: Path, progress: bool) -> Path:
    """The converted directory of the GGUF file at `path`, converting it first if needed.

    A bundled model's file maps to that model's directory; any other file to
    one named after its stem and a digest of its resolved path, size and
    modification time, so a changed file is converted again.
    """
    path = path.resolve()
    for bundled in registry.BUNDLED.values():
        if bundled.gguf_name == path.name:
            with contextlib.suppress(ModelNotFoundError):
                if registry.locate_gguf(bundled).resolve() == path:
                    return _ensure_converted(bundled, cache_dir, progress)
    stat = path.stat()
    digest = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    model_dir = convert.converted_dir(cache_dir, f"gguf-{path.stem}-{digest}")
    if not convert.is_converted(model_dir):
        convert.convert_gguf(path, model_dir, progress=progress)
    return model_dir


def _load_dir(
    model_dir: Path, name: str, dtype: torch.dtype, reason: str, device: torch.device
) -> LoadedModel:
    """Load model and (if the directory has one) tokenizer from a local HF directory."""
    with convert.quiet_transformers(errors_only=False):
        # Check the family before reading any weights.
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        adapter_for(config)
        hf_model = AutoModelForCausalLM.from_pretrained(
            model_dir, config=config, dtype=dtype, local_files_only=True
        )
        tokenizer = None
        if any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    hf_model.to(device)  # type: ignore[arg-type]  # transformers types `to` by its own wrapper
    model = LoadedModel.from_hf(hf_model, tokenizer, name=name)
    model.dtype_reason = reason
    return model


def _as_ids(value: int | list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
