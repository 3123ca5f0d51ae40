"""`KVEngineCache` on the bundled SmolLM2-135M loaded by plain transformers, and README's example run as is.

The model comes from `AutoModelForCausalLM.from_pretrained` on the converted
bundled directory, as a transformers user would load it. Without a press the
tokens equal transformers' own `generate`; README's "From transformers"
example is executed verbatim and its tokens equal kvengine's engine with the
same press on the same prompt.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvengine.compat import KVEngineCache, SnapKVPress
from kvengine.config import CacheConfig, default_cache_dir
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.models import LoadedModel, convert

pytestmark = pytest.mark.model

README = Path(__file__).resolve().parents[1] / "README.md"
DOCUMENT = (
    "".join(
        f"Record {i}: the {['north', 'east', 'south', 'west'][i % 4]} gate was inspected and found in order.\n"
        for i in range(12)
    )
    + "Record 12: the access code of the archive room is 985440.\n"
)
QUESTION = "\nQuestion: what is the access code of the archive room? Answer:"


@pytest.fixture(scope="module")
def plain(bundled: LoadedModel) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The bundled model as plain transformers loads it (the `bundled` fixture converted it)."""
    model_dir = convert.converted_dir(default_cache_dir(), "smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("### From transformers") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_readme_example_is_six_lines() -> None:
    assert len([line for line in readme_example().splitlines() if line.strip()]) == 6


def test_no_press_equals_plain_generate(plain: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = plain
    inputs = tokenizer(DOCUMENT + QUESTION, return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    with KVEngineCache(model) as cache:
        got = model.generate(**inputs, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert got.tolist() == expected.tolist()
    assert model.config._attn_implementation == "sdpa"


def test_readme_example_runs_and_matches_the_engine(
    plain: tuple[PreTrainedModel, PreTrainedTokenizerBase], capsys: pytest.CaptureFixture[str]
) -> None:
    model, tokenizer = plain
    namespace: dict[str, Any] = {
        "model": model,
        "tokenizer": tokenizer,
        "document": DOCUMENT,
        "question": QUESTION,
    }
    exec(readme_example(), namespace)
    printed = capsys.readouterr().out
    held = float(re.search(r"KV cache held: ([0-9.]+) of the uncompressed one", printed).group(1))  # type: ignore[union-attr]
    assert 0.45 <= held <= 0.56, printed  # half the prompt's blocks, plus the generated tokens' own
    cache: KVEngineCache = namespace["cache"]
    assert cache.compression is not None and cache.compression[1] / cache.compression[0] == pytest.approx(
        0.5, abs=0.02
    )
    assert cache.pool.bytes_in_use == 0 and model.config._attn_implementation == "sdpa"

    prompt = namespace["inputs"].input_ids[0].tolist()
    answer = namespace["out"][0, len(prompt) :].tolist()
    engine = Engine(LoadedModel.from_hf(model, tokenizer), CacheConfig(max_kv_bytes=256 * 2**20))
    rid = engine.add_request(prompt, SamplingParams(max_tokens=16), press=SnapKVPress(ratio=0.5))
    while engine.has_unfinished():
        engine.step()
    assert answer == engine.release(rid).output_ids
    assert printed.rstrip().endswith(tokenizer.decode(answer, skip_special_tokens=True).rstrip())
