"""Prompt embeddings for the semantic cache: unit vectors whose inner product says how alike two prompts are.

Registry `EMBEDDERS`; every embedder maps a list of texts to float32 rows of
unit length (`embed`), deterministically. Nothing is downloaded:

- `model-hidden`: the served model's own hidden states after a middle
  layer, put through the model's final norm (which evens out the tokens'
  scales), mean-pooled over the prompt's tokens (the first token left out: decoder
  models park huge activations there), then centred on the mean of a few
  fixed reference sentences (a decoder's raw hidden states all point one
  way, which makes every cosine high). It runs a separate forward pass on a
  twin of the model that shares its weights (no copy) but has its own
  config, using SDPA attention, with only the layers up to the chosen one:
  the engine's own model object, whose attention implementation is
  kvengine's, is never touched, so it is safe while the engine runs.
- `model-static`: the mean of the served model's input-embedding rows for
  the prompt's tokens (no forward pass), centred the same way.
- `hashed-ngrams`: word and character n-grams hashed into a fixed number of
  signed buckets, no model at all (fast; the tests' embedder).

Not here: the index (index.py), thresholds, or any caching.
"""

from __future__ import annotations

import copy
import itertools
import zlib
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.registry import Registry

# Sentences of no one topic, embedded once to find the direction all hidden states share.
_REFERENCE = (
    "The weather was mild for most of the week.",
    "Please send me the report before Friday.",
    "How many apples are left in the basket?",
    "Which road leads to the old harbour?",
    "Write a short poem about the sea.",
    "What time does the museum open on Sundays?",
    "Explain how a bicycle gear works.",
    "List three facts about volcanoes.",
)


class Embedder(ABC):
    """Texts -> unit vectors. Contract: `embed` returns (len(texts), dim) float32 rows of L2 norm 1
    (a text with no features gets the zero vector), the same rows for the same texts every time."""

    dim: int

    @classmethod
    @abstractmethod
    def create(cls, model: LoadedModel | None) -> Embedder:
        """An instance for the served `model` (None where it needs none); InvalidRequestError if unusable."""

    @abstractmethod
    def embed(self, texts: list[str]) -> np.ndarray: ...


EMBEDDERS: Registry[Embedder] = Registry("embedder", "embedders")


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


@EMBEDDERS.register("hashed-ngrams")
class HashedNgramEmbedder(Embedder):
    """Word 1-2 grams and character 3-grams, hashed (crc32) into `dim` signed buckets, counts -> unit vector."""

    def __init__(self, dim: int = 1024) -> None:
        self.dim = dim

    @classmethod
    def create(cls, model: LoadedModel | None) -> Embedder:
        return cls()

    def _features(self, text: str) -> list[str]:
        words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
        grams = words + [a + " " + b for a, b in itertools.pairwise(words)]
        joined = " " + " ".join(words) + " "
        return grams + [joined[i : i + 3] for i in range(len(joined) - 2)]

    def embed(self, texts: list[str]) -> np.ndarray:
        rows = np.zeros((len(texts), self.dim), np.float64)
        for row, text in zip(rows, texts, strict=True):
            for feature in self._features(text):
                h = zlib.crc32(feature.encode())
                row[h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        return _unit(rows)


class _ModelEmbedder(Embedder):
    """Shared by the model-based embedders: tokenizing, pooling without the first token, centring."""

    def __init__(self, model: LoadedModel) -> None:
        if model.tokenizer is None:
            raise InvalidRequestError(f"the {type(self).__name__} needs a model with a tokenizer")
        self.tokenizer = model.tokenizer
        self.centre = np.zeros(1, np.float64)
        self.centre = self._pooled(list(_REFERENCE)).mean(axis=0)
        self.dim = int(self.centre.shape[0])

    @classmethod
    def create(cls, model: LoadedModel | None) -> Embedder:
        if model is None:
            raise InvalidRequestError(f"embedder {cls.__name__} needs the served model")
        return cls(model)

    @abstractmethod
    def _token_states(self, ids: torch.Tensor) -> torch.Tensor:
        """(T, D) states of one prompt's token ids (T,)."""

    @torch.no_grad()
    def _pooled(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            ids = torch.tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
            states = self._token_states(ids).double()  # (T, D)
            rows.append((states[1:] if len(states) > 1 else states).mean(0).cpu().numpy())
        return np.stack(rows)

    def embed(self, texts: list[str]) -> np.ndarray:
        empty = [not t.strip() for t in texts]
        rows = self._pooled([t if t.strip() else "." for t in texts]) - self.centre
        rows[np.asarray(empty, dtype=bool)] = 0.0
        return _unit(rows)


@EMBEDDERS.register("model-static")
class StaticEmbedder(_ModelEmbedder):
    """The served model's input embeddings of the prompt's tokens, mean-pooled and centred."""

    def __init__(self, model: LoadedModel) -> None:
        self.table: torch.Tensor = model.hf_model.get_input_embeddings().weight  # type: ignore[assignment]
        super().__init__(model)

    def _token_states(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids.to(self.table.device)]


@EMBEDDERS.register("model-hidden")
class HiddenStateEmbedder(_ModelEmbedder):
    """Hidden states after layer `layer` (default: the middle one), normed, of a weight-sharing SDPA twin.

    The twin ends at that layer, so transformers applies the final norm to
    its last hidden states, as it does to the full model's last ones.
    """

    def __init__(self, model: LoadedModel, layer: int | None = None) -> None:
        self.layer = model.num_layers // 2 if layer is None else layer
        if not 1 <= self.layer <= model.num_layers:
            raise InvalidRequestError(f"layer must be in [1, {model.num_layers}], got {self.layer}")
        self.twin = _truncated_twin(model, self.layer)
        super().__init__(model)

    def _token_states(self, ids: torch.Tensor) -> torch.Tensor:
        device = next(self.twin.parameters()).device
        out = self.twin(input_ids=ids[None].to(device), output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[self.layer][0]


def _truncated_twin(model: LoadedModel, num_layers: int) -> Any:
    """A model of `model`'s family with its first `num_layers` layers, SDPA attention, sharing its tensors."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:num_layers]
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    source = model.hf_model
    twin.load_state_dict(source.state_dict(), strict=False, assign=True)
    own = dict(source.named_buffers())
    for name, _ in list(twin.named_buffers()):  # non-persistent buffers (RoPE frequencies)
        owner, _, attr = name.rpartition(".")
        twin.get_submodule(owner).register_buffer(attr, own[name], persistent=False)
    twin.eval()
    twin.requires_grad_(False)
    return twin


def make_embedder(name: str, model: LoadedModel | None = None) -> Embedder:
    """The embedder registered as `name`; InvalidRequestError listing the known ones otherwise."""
    return EMBEDDERS.lookup(name).create(model)
