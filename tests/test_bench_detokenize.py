"""`bench detokenize` on a byte tokenizer: both streams measured at every window, text unchanged."""

from __future__ import annotations

from test_server import ByteTokenizer

from kvengine.bench import detokenize
from kvengine.engine.generate import TextStream


def test_rows_cover_both_streams_at_every_window() -> None:
    rows = detokenize.run(ByteTokenizer(), 600, repeats=1)
    starts = detokenize._positions(600)
    assert starts == [0, 256, 512, 536]
    got = {(r["config"]["stream"], r["config"]["position"]) for r in rows}
    assert got == {(s, p) for s in ("incremental", "redecode") for p in starts}
    assert all(r["value"] > 0 for r in rows)


def test_the_streamed_text_is_the_whole_decode() -> None:
    tokenizer = ByteTokenizer()
    ids = detokenize.output_ids(tokenizer, 300)
    stream, out, text = TextStream(tokenizer), [], ""
    for token in ids:
        out.append(token)
        text += stream.update(out, final=False)
    text += stream.update(out, final=True)
    assert len(ids) == 300 and text == tokenizer.decode(ids)
