"""The text front: streaming, stop strings, bad input (tiny models and a fake tokenizer)."""

from __future__ import annotations

import pytest
from conftest import hf_greedy

from kvengine.engine.generate import TextStream, generate
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel


class CharTokenizer:
    """Token i decodes to chr(i); ids >= 0x80 are two-byte UTF-8 halves (0xC3, then the next)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def stream_all(ids: list[int], stop: tuple[str, ...]) -> tuple[str, str, bool]:
    stream = TextStream(CharTokenizer(), stop)
    shown = ""
    for n in range(1, len(ids) + 1):
        shown += stream.update(ids[:n], final=n == len(ids))
        if stream.stopped:
            break
    return shown, stream.text, stream.stopped


def test_stream_shows_everything_once_without_stop() -> None:
    text = "hello, world"
    shown, final, stopped = stream_all(list(text.encode()), ())
    assert shown == final == text and not stopped


def test_stream_cuts_at_a_stop_string_and_never_shows_it() -> None:
    shown, final, stopped = stream_all(list(b"one two STOP three"), ("STOP",))
    assert stopped and final == "one two " and shown == "one two "


def test_stream_holds_back_half_characters() -> None:
    ids = list("caf\u00e9!".encode())  # é is two bytes
    stream = TextStream(CharTokenizer(), ())
    shown = [stream.update(ids[:n], final=False) for n in range(1, len(ids) + 1)]
    assert "\ufffd" not in "".join(shown)
    assert "".join(shown) == "caf\u00e9!"


def test_generate_on_token_ids_matches_hf(tiny_llama: LoadedModel) -> None:
    prompts = [[5, 6, 7, 8], [9] * 30]
    completions = generate(tiny_llama, prompts, max_tokens=10)
    for c, p in zip(completions, prompts, strict=True):
        assert c.token_ids == hf_greedy(tiny_llama, p, 10)
        assert c.num_prompt_tokens == len(p) and c.finish_reason == "length"
        assert c.kv_bytes > 0 and c.ttft_s > 0


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        ([], {}, "no prompts"),
        ([[]], {}, "prompt is empty"),
        ("   ", {}, "prompt is empty"),
        ("hello", {}, "no tokenizer"),
        ([[1, 2, 3]], {"max_tokens": 0}, "max_tokens must be >= 1"),
        ([[1, 2, 3]], {"max_tokens": -5}, "max_tokens must be >= 1"),
        ([[1] * 1024], {}, "context is 1024 tokens"),
        ([[1, 999]], {}, "token ids must be in"),
        ([[1, 2]], {"stop": ["x"]}, "stop strings need a tokenizer"),
    ],
)
def test_bad_input_is_a_clear_error(
    tiny_llama: LoadedModel, prompts: object, kwargs: dict, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        generate(tiny_llama, prompts, **kwargs)  # type: ignore[arg-type]


def test_request_larger_than_the_pool_is_rejected_at_admission(tiny_llama: LoadedModel) -> None:
    from kvengine.config import CacheConfig

    with pytest.raises(InvalidRequestError, match="more KV memory than the pool holds"):
        generate(tiny_llama, [[1] * 500], max_tokens=10, cache_config=CacheConfig(max_kv_bytes=2**16))
