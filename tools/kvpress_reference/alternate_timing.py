"""kvengine and kvpress timed on one eval example, alternating which goes first.

A diagnostic for the per-setting time gap in `kvengine eval --baseline kvpress`:
the same 2,048-token single-needle example and press (knorm at 0.5), answered
by kvengine (`kvengine.eval.measure.measure`, as the eval does) and by
the kvpress worker, `ROUNDS` times each, kvengine first in even rounds and
second in odd ones. Prints median prefill and total seconds per engine and
position. Needs the kvpress venv (see README.md next to this file); its python
is the argument (default: where the README's recipe puts it).

    .venv/bin/python tools/kvpress_reference/alternate_timing.py [KVPRESS_PYTHON]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from kvengine.engine.generate import encode_prompt
from kvengine.eval.kvpress_client import KvpressWorker
from kvengine.eval.measure import measure
from kvengine.eval.tasks import make_example
from kvengine.models import load

ROUNDS, LENGTH, PRESS, RATIO, MAX_NEW_TOKENS = 6, 2048, "knorm", 0.5, 32
RECIPE_PYTHON = Path("/tmp/kvp-venv/bin/python")  # where README.md's recipe puts the kvpress venv


def main(kvpress_python: Path) -> None:
    torch.set_num_threads(2)
    model = load()
    assert model.tokenizer is not None
    example = make_example("niah_single", model.tokenizer, LENGTH, 0, 0, 0.5, model.max_context_len)
    parts = [encode_prompt(model, example.context, None, None, q.text) for q in example.questions]
    ids, rests = parts[0][0], [rest for _, rest in parts]
    times: dict[str, list[tuple[float, float]]] = {}
    with KvpressWorker(kvpress_python, model, torch.get_num_threads()) as worker:

        def ours() -> tuple[float, float]:
            (m,) = measure(model, ids, rests, [(PRESS, RATIO, 0)], MAX_NEW_TOKENS)
            return m.prefill_s, m.prefill_s + m.compress_s + m.answer_s

        def theirs() -> tuple[float, float]:
            (r,) = worker.run(ids, rests, MAX_NEW_TOKENS, [(PRESS, RATIO)])  # to its "done" line
            return r["prefill_s"], r["prefill_s"] + r["answer_s"]

        ours(), theirs()  # warm up both
        for i in range(ROUNDS):
            order = [("kvengine", ours), ("kvpress", theirs)]
            for position, (name, run) in enumerate(order if i % 2 == 0 else order[::-1]):
                times.setdefault(f"{name} {'first' if position == 0 else 'second'}", []).append(run())
    for key, values in times.items():
        prefill = statistics.median(p for p, _ in values)
        total = statistics.median(t for _, t in values)
        print(f"{key}: prefill {prefill:.2f} s, total {total:.2f} s, over {len(values)} runs")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else RECIPE_PYTHON)
