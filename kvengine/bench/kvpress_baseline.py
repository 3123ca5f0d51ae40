"""`kvengine eval --baseline kvpress`: the same examples answered by kvpress, in kvpress's own venv.

kvpress 0.5.5 pins `transformers<5.3` and kvengine needs a newer one, so the
two cannot share a process: a worker, `tools/kvpress_reference/run_examples.py`,
runs under the kvpress venv's python (recipe in `tools/kvpress_reference/README.md`),
loads the same model directory, and answers each example through kvpress's
pipeline. This module starts it, speaks its JSON-lines protocol (see the
worker's docstring) and builds requests from kvengine's own tokenization and
press hyperparameters, so both engines get the same ids and the same press.
It does not score or write rows: `kvengine.bench.eval` does, for both engines
alike.

Only presses kvpress also has run on both engines (`is_shared`); KIVI widths
and kvengine-only presses (h2o, scissorhands, per_layer) run on kvengine alone.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from kvengine.bench.eval_kvengine import row_seconds
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press import press_from_spec

BASELINES = ("kvpress",)
DEFAULT_KVPRESS_PYTHON = Path("/tmp/kvp-venv/bin/python")  # where tools/kvpress_reference/README.md puts it
WORKER = Path(__file__).resolve().parents[2] / "tools" / "kvpress_reference" / "run_examples.py"
RECIPE = "see tools/kvpress_reference/README.md for the venv recipe"
# Not pyramidkv: kvpress's per-layer budgets leave layers of different lengths, and its decoding under
# SDPA (the only attention on a CPU) fails on them ("size of tensor a (975) must match ... (1007)");
# kvpress decodes those only with flash attention.
SHARED_PRESSES = (
    "none",
    "knorm",
    "keydiff",
    "snapkv",
    "tova",
    "expected_attention",
    "streaming_llm",
    "random",
)
SHARED_WRAPPERS = ("adakv",)


def is_shared(spec: str) -> bool:
    """Whether kvpress has press `spec` too ("snapkv", "adakv:snapkv"; "none" is the uncompressed run)."""
    *wrappers, name = spec.split(":")
    return name in SHARED_PRESSES and len(wrappers) <= 1 and all(w in SHARED_WRAPPERS for w in wrappers)


def press_kwargs(spec: str, ratio: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inner press, wrapper) hyperparameters of kvengine's press, by field name, ratio left out.

    The field names are kvpress's too; the worker refuses any kvpress lacks, so
    a hyperparameter that differs cannot pass unnoticed.
    """
    if spec == "none":
        return {}, {}
    press = press_from_spec(spec, ratio)
    fields = {f.name: getattr(press, f.name) for f in dataclasses.fields(press) if f.init}  # type: ignore[arg-type]
    inner = fields.pop("press", None)
    if inner is None:
        return {k: v for k, v in fields.items() if k != "ratio"}, {}
    inner_fields = dataclasses.fields(inner)
    return {f.name: getattr(inner, f.name) for f in inner_fields if f.init and f.name != "ratio"}, fields


def model_dir(model: LoadedModel) -> Path:
    """The Hugging Face directory `model` was loaded from (the worker loads the same weights)."""
    path = Path(str(model.hf_model.name_or_path or ""))
    if not path.name or not (path / "config.json").is_file():
        raise InvalidRequestError(
            f"the kvpress baseline needs a model loaded from a directory; {model.name!r} was not"
        )
    return path


class KvpressWorker:
    """The kvpress worker process: started on entry, answers `run()` calls, stopped on exit.

    Raises InvalidRequestError naming the README recipe when the python is
    missing or kvpress does not import there, and with the worker's message
    when a request fails.
    """

    def __init__(self, python: Path, model: LoadedModel, threads: int) -> None:
        self.python, self.model, self.threads = Path(python), model, threads
        self.versions: dict[str, str] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None
        self._next_id = 0

    def __enter__(self) -> KvpressWorker:
        if not self.python.is_file():
            raise InvalidRequestError(f"kvpress python {self.python} does not exist; {RECIPE}")
        directory = model_dir(self.model)
        if not WORKER.is_file():
            raise InvalidRequestError(
                f"the kvpress worker script {WORKER} is missing (run from a source checkout)"
            )
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self._proc = subprocess.Popen(
            [str(self.python), str(WORKER), str(directory), str(self.threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            encoding="utf-8",
        )
        try:
            hello = self._read()
            if not hello.get("ready"):
                raise InvalidRequestError(
                    f"kvpress is not usable under {self.python}: {hello.get('error')}; {RECIPE}"
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.versions = dict(hello.get("versions", {}))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise InvalidRequestError(
                f"the kvpress worker under {self.python} stopped: {self._stderr_tail()}"
            )
        try:
            return dict(json.loads(line))
        except (json.JSONDecodeError, TypeError, ValueError):
            raise InvalidRequestError(
                f"the kvpress worker wrote a line that is not JSON: {line[:200]!r}"
            ) from None

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()[-2000:].strip() or "(no message)"

    def run(
        self,
        context_ids: list[int],
        question_ids: list[list[int]],
        max_new_tokens: int,
        settings: list[tuple[str, float]],
    ) -> Iterator[dict[str, Any]]:
        """One reply per (press, ratio) in `settings`, yielded as the worker finishes it: outputs, kv bytes
        and seconds as the worker measured them, or `{"press", "ratio", "error"}` where kvpress failed.

        Consume it to the end before the next call (the replies share one pipe).
        """
        assert self._proc is not None and self._proc.stdin is not None, (
            "use KvpressWorker as a context manager"
        )
        request_id, self._next_id = self._next_id, self._next_id + 1
        wire = []
        for spec, ratio in settings:
            kwargs, wrapper_kwargs = press_kwargs(spec, ratio)
            wire.append({"press": spec, "ratio": ratio, "kwargs": kwargs, "wrapper_kwargs": wrapper_kwargs})
        request = {"id": request_id, "context_ids": context_ids, "question_ids": question_ids}
        request.update(max_new_tokens=max_new_tokens, settings=wire)
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        while True:
            reply = self._read()
            if reply.get("id") != request_id:
                raise InvalidRequestError(
                    f"the kvpress worker answered request {reply.get('id')}, not {request_id}"
                )
            if reply.get("done"):
                return
            yield reply


def _pair_key(row: dict[str, Any]) -> tuple[Any, ...]:
    c = row["config"]
    return (
        c.get("model"),
        c.get("seed"),
        c["task"],
        c["length"],
        c["example"],
        c["press"],
        float(c["ratio"]),
        c["kivi"],
    )


def paired_rows(
    rows: list[dict[str, Any]],
) -> dict[tuple[str, float], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """(kvengine row, kvpress row) pairs of the same example and setting, by (press, ratio).

    Only examples both engines answered count, so the two columns of the
    comparison average over the same questions.
    """
    ours = {_pair_key(r): r for r in rows if r["config"].get("engine", "kvengine") == "kvengine"}
    pairs: dict[tuple[str, float], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for r in rows:
        if r["config"].get("engine") == "kvpress" and _pair_key(r) in ours:
            key = (str(r["config"]["press"]), float(r["config"]["ratio"]))
            pairs.setdefault(key, []).append((ours[_pair_key(r)], r))
    return pairs


def _compared(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    """The formatted columns of one press x ratio: accuracies, answers alike, KV fractions, seconds."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    same = [a == b for ours, theirs in pairs for a, b in zip(ours["outputs"], theirs["outputs"], strict=True)]
    t_ours, t_theirs = mean([row_seconds(a) for a, _ in pairs]), mean([row_seconds(b) for _, b in pairs])
    return [
        f"{mean([a['value'] for a, _ in pairs]):.3f}",
        f"{mean([b['value'] for _, b in pairs]):.3f}",
        f"{mean([float(x) for x in same]):.2f}",
        f"{mean([a['kv_bytes'] / a['kv_bytes_full'] for a, _ in pairs]):.3f}",
        f"{mean([b['kv_bytes'] / b['kv_bytes_full'] for _, b in pairs]):.3f}",
        f"{t_ours:.2f}",
        f"{t_theirs:.2f}",
        f"{t_theirs / t_ours:.2f}",
    ]


def compare_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per press x ratio, both engines' accuracy, answers alike, KV bytes and seconds per example.

    Empty when no row has a kvpress twin. "same answers" is the fraction of
    questions whose answer text is identical on both engines.
    """
    from kvengine.bench.report import markdown_table

    pairs = paired_rows(rows)
    order = sorted(pairs, key=lambda k: (k[0] != "none", k[0], k[1]))
    lines = [
        [press, f"{ratio:.2f}", len(pairs[press, ratio]), *_compared(pairs[press, ratio])]
        for press, ratio in order
    ]
    if not lines:
        return ""
    header = [
        "press", "ratio", "examples", "accuracy kvengine", "accuracy kvpress", "same answers",
        "KV bytes / full kvengine", "KV bytes / full kvpress", "s / example kvengine", "s / example kvpress",
        "kvpress / kvengine time",
    ]  # fmt: skip
    return markdown_table(header, lines)


def _example_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return _pair_key(row)[:5]  # (model, seed, task, length, example)


def time_tables(rows: list[dict[str, Any]]) -> str:
    """Markdown: both engines' seconds by context length, two ways, over the (example, setting) pairs both ran.

    Per setting: each setting as one request would run it, from the context's
    ids (kvengine's row carries the whole prefill it shares), medians over the
    pairs, with the median of the per-pair ratios. Per example: every shared
    setting of one example, as `kvengine eval` runs them: kvengine prefills a
    context once (each distinct prefill counted once, so a resumed example that
    prefilled twice pays twice) and compresses a copy per setting; kvpress
    prefills under each press. Empty when no row has a kvpress twin.
    """
    import statistics

    from kvengine.bench.report import markdown_table

    pairs = [pair for group in paired_rows(rows).values() for pair in group]
    if not pairs:
        return ""
    by_length: dict[int, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for ours, theirs in pairs:
        by_length.setdefault(int(ours["config"]["length"]), []).append((ours, theirs))

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}"

    per_setting, per_example = [], []
    for length, group in sorted(by_length.items()):
        per_setting.append(
            [
                length,
                len(group),
                med([a["prefill_s"] for a, _ in group]),
                med([a["compress_s"] for a, _ in group]),
                med([a["answer_s"] for a, _ in group]),
                med([b["prefill_s"] for _, b in group]),
                med([b["answer_s"] for _, b in group]),
                med([row_seconds(a) for a, _ in group]),
                med([row_seconds(b) for _, b in group]),
                med([row_seconds(b) / row_seconds(a) for a, b in group]),
            ]
        )
        examples: dict[tuple[Any, ...], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
        for a, b in group:
            examples.setdefault(_example_key(a), []).append((a, b))
        ours_s = [
            sum({a["prefill_s"] for a, _ in ex}) + sum(a["compress_s"] + a["answer_s"] for a, _ in ex)
            for ex in examples.values()
        ]
        theirs_s = [sum(row_seconds(b) for _, b in ex) for ex in examples.values()]
        per_example.append(
            [
                length,
                len(examples),
                f"{len(group) / len(examples):.1f}",
                f"{sum(ours_s) / len(ours_s):.1f}",
                f"{sum(theirs_s) / len(theirs_s):.1f}",
                f"{sum(theirs_s) / sum(ours_s):.2f}",
            ]
        )
    setting_header = [
        "context tokens", "pairs", "prefill kvengine", "compression kvengine", "answers kvengine",
        "prefill + compression kvpress", "answers kvpress", "s / setting kvengine", "s / setting kvpress",
        "kvpress / kvengine time",
    ]  # fmt: skip
    example_header = [
        "context tokens", "examples", "settings per example", "s / example (all settings) kvengine",
        "s / example (all settings) kvpress",
        "kvpress / kvengine time",
    ]  # fmt: skip
    return (
        "Per setting (each from its own prefill, as one request runs; medians over the pairs, and the median "
        "of the per-pair ratios):\n\n"
        + markdown_table(setting_header, per_setting)
        + "\n\nPer example (all of an example's shared settings, as `kvengine eval` runs them: kvengine "
        "prefills the context once and compresses a copy per setting, kvpress prefills under each press; "
        "means over examples):\n\n" + markdown_table(example_header, per_example)
    )
