"""The text front: streaming, stop strings, bad input (tiny models and a fake tokenizer)."""

from __future__ import annotations

import random

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


class PieceTokenizer:
    """SentencePiece-like: each id is a piece, "_" a space; a decoded text never starts with a space.

    Stripping the first space makes a window's text differ from the full text's
    slice, which the incremental decoder must not get wrong.
    """

    PIECES = ("_the", "_cat", "s", "_sat", ".", "_", "caf", "\u00e9", "_\u4f60\u597d", "!")

    def __init__(self) -> None:
        self.num_decoded = 0  # ids passed to decode, all calls together

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.num_decoded += len(ids)
        return "".join(self.PIECES[i] for i in ids).replace("_", " ").removeprefix(" ")


def _streamed(tokenizer: object, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)  # type: ignore[arg-type]
    deltas = []
    for n in range(1, len(ids) + 1):
        deltas.append(stream.update(ids[:n], final=n == len(ids)))
        if stream.stopped:
            break
    return deltas, stream


@pytest.mark.parametrize("seed", range(20))
def test_window_decoding_equals_full_decoding(seed: int) -> None:
    rng = random.Random(seed)
    tok = PieceTokenizer()
    ids = [rng.randrange(len(tok.PIECES)) for _ in range(rng.randrange(1, 60))]
    deltas, stream = _streamed(tok, ids)
    assert "".join(deltas) == stream.text == tok.decode(ids)
    byte_ids = list(rng.randbytes(rng.randrange(1, 40)))  # invalid UTF-8 too: decoded with U+FFFD
    deltas, stream = _streamed(CharTokenizer(), byte_ids)
    assert "".join(deltas) == CharTokenizer().decode(byte_ids)


def test_window_decoding_does_not_redecode_the_output() -> None:
    tok = PieceTokenizer()
    ids = [i % len(tok.PIECES) for i in range(3000)]
    _streamed(tok, ids)
    # One full decode at the end (3000 ids) plus a short window per token; decoding the
    # whole output at every token would pass 4.5 million ids.
    assert tok.num_decoded < 3000 + 10 * len(ids)


def _text_cases(tok: object) -> list[list[int]]:
    texts = [
        "caf\u00e9 na\u00efve \u4f60\u597d\u4e16\u754c \U0001f389\U0001f680 \u00d8resund",
        "plain ascii text.",
    ]
    return [list(tok.encode(t, add_special_tokens=False)) for t in texts]  # type: ignore[attr-defined]


@pytest.mark.model
def test_decode_stream_equals_full_decoding_on_the_bundled_tokenizer(bundled: LoadedModel) -> None:
    tok = bundled.tokenizer
    assert tok is not None
    assert TextStream(tok).detokenizer._stream is not None  # the DecodeStream path
    multibyte = _text_cases(tok)[0]
    assert any("\ufffd" in tok.decode([t]) for t in multibyte)  # characters really split across tokens
    rng = random.Random(0)
    cases = _text_cases(tok) + [
        [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 50))] for _ in range(200)
    ]
    for ids in cases:
        deltas, stream = _streamed(tok, ids)
        full = tok.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) == stream.text == full, ids
    for ids in _text_cases(tok):
        full = tok.decode(ids, skip_special_tokens=True)
        for start in range(0, len(full) - 2, 3):
            stop = full[start : start + 2]
            deltas, stream = _streamed(tok, ids, (stop,))
            assert "".join(deltas) == stream.text == full[: full.find(stop)], stop
            assert stream.stopped
