"""Which heads retrieve: an induction/copy probe on repeated random tokens, cached per model.

The probe (after RazorAttention's echo and induction heads, arXiv:2407.15891,
and DuoAttention's retrieval heads, arXiv:2410.10819, training-free): a
sequence of `length` random token ids followed by the same ids again. While
reading the second copy, at the copy of token t, a head that retrieves looks
back at the first occurrence of t (echo) or at the token after it
(induction: what came next last time). A head's score is its attention mass
on those two keys, averaged over the second copy and over `num_samples`
sequences; a kv-head scores the maximum of its query heads (one of them
retrieving is reason to keep the kv-head's cache).

Scores are written as JSON under `<kvengine cache dir>/heads/`, keyed by the
model's name, a fingerprint of its weights and the probe's settings, and
read back afterwards (the "head map" the `duo` method uses). The probe runs
the model's own eager attention once (seconds for a 135M model on a CPU);
it changes nothing in the model (its attention implementation is restored).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvengine.config import default_cache_dir
from kvengine.models.own_attention import use_attention

if TYPE_CHECKING:
    from kvengine.models import LoadedModel

PROBE = {"length": 128, "num_samples": 2, "seed": 0}


def fingerprint(model: LoadedModel) -> str:
    """A short hash of the model's name, shape and some of its weights (two models named alike differ)."""
    h = hashlib.sha256(f"{model.name}:{model.num_layers}:{model.num_heads}:{model.num_kv_heads}".encode())
    for _, param in list(model.hf_model.named_parameters())[:4]:
        h.update(param.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_path(model: LoadedModel, cache_dir: Path | None = None) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.name)
    return (cache_dir or default_cache_dir()) / "heads" / f"{safe}-{fingerprint(model)}.json"


def head_scores(model: LoadedModel, cache_dir: Path | None = None, refresh: bool = False) -> torch.Tensor:
    """Retrieval scores `(L, H_kv)` of `model`'s kv-heads: read from the cache, else probed and cached."""
    path = cache_path(model, cache_dir)
    if path.exists() and not refresh:
        data = json.loads(path.read_text())
        if data.get("probe") == PROBE:
            return torch.tensor(data["scores"], dtype=torch.float64, device="cpu")
    scores = probe(model, **PROBE)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": model.name, "probe": PROBE, "scores": scores.tolist()}))
    tmp.replace(path)  # whole or not at all
    return scores


def probe(model: LoadedModel, length: int, num_samples: int, seed: int) -> torch.Tensor:
    """Per (layer, kv-head): max over its query heads of the echo + induction attention mass."""
    gen = torch.Generator(device="cpu").manual_seed(seed)  # the same probe tokens on every device
    vocab = int(model.config.vocab_size)
    low = min(100, vocab // 4)  # skip the lowest ids, where special tokens usually sit
    hf = model.hf_model
    total = torch.zeros(model.num_layers, model.num_heads, dtype=torch.float64, device="cpu")
    # eager: the only implementation that returns attention weights
    with use_attention(hf, "eager"), torch.inference_mode():
        for _ in range(num_samples):
            first = torch.randint(low, vocab, (length,), generator=gen, device="cpu")
            ids = torch.cat([first, first])[None].to(hf.device)
            out = hf(input_ids=ids, output_attentions=True, use_cache=False)
            total += torch.stack([_retrieval_mass(a[0].double(), length) for a in out.attentions]).cpu()
    per_query_head = total / num_samples  # (L, H_q)
    group = model.num_heads // model.num_kv_heads
    return per_query_head.view(model.num_layers, model.num_kv_heads, group).amax(-1)


def _retrieval_mass(attn: torch.Tensor, length: int) -> torch.Tensor:
    """attn `(H, 2n, 2n)` of one layer -> `(H,)`: mean attention on the echo and induction keys.

    Query `n + t` reads token t again; its echo key is t, its induction key t + 1.
    """
    t = torch.arange(1, length - 1, device=attn.device)
    queries = length + t
    return (attn[:, queries, t] + attn[:, queries, t + 1]).mean(-1)
