"""`kvengine eval` runner: rows per setting, answers equal to `generate`, resume after an interruption."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_model
from test_tasks import ByteTokenizer

from kvengine.engine.generate import generate
from kvengine.errors import InvalidRequestError
from kvengine.eval.compare import compare_table, time_tables
from kvengine.eval.kvpress_client import KvpressWorker, press_kwargs
from kvengine.eval.resume import done_keys, row_key
from kvengine.eval.runner import EvalConfig, run_eval
from kvengine.eval.tasks import default_depth, make_example, uses_depth
from kvengine.models import LoadedModel
from kvengine.press import press_from_spec

CFG = EvalConfig(
    tasks=("niah_single", "niah_multiquery"),
    lengths=(160,),
    presses=("none", "knorm", "snapkv"),
    ratios=(0.5,),
    kivi=(2,),
    num_examples=2,
    max_new_tokens=3,
)
FIELDS = {"value", "scores", "outputs", "kv_bytes", "kv_bytes_full", "prefill_s", "compress_s", "answer_s"}


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    m = tiny_model("llama")
    m.tokenizer = ByteTokenizer()  # type: ignore[assignment]
    return m


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _all_keys(cfg: EvalConfig, model: str = "tiny-llama") -> list[tuple[Any, ...]]:
    """Every key a run of `cfg` writes, in the order it runs them: task, length, example, then setting."""
    return [
        (
            "kvengine",
            model,
            cfg.seed,
            task,
            n,
            i,
            default_depth(i, cfg.num_examples) if uses_depth(task) else None,
            *s,
        )
        for task in cfg.tasks
        for n in cfg.lengths
        for i in range(cfg.num_examples)
        for s in cfg.settings()
    ]


def test_rows_have_every_key_and_field(model: LoadedModel, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    rows = run_eval(model, CFG, out, progress=False)
    assert rows == _rows(out)
    assert [row_key(r) for r in rows] == _all_keys(CFG)  # each key once, in plan order
    for r in rows:
        assert set(r) >= FIELDS and r["bench"] == "eval" and 0.0 <= r["value"] <= 1.0
        assert r["num_questions"] == (4 if r["config"]["task"] == "niah_multiquery" else 1)
        c = r["config"]
        if c["press"] == "none" and c["kivi"] == 0:
            assert r["kv_bytes"] == r["kv_bytes_full"]
        else:  # half the tokens evicted (or 2-bit packed): well under the full cache
            assert r["kv_bytes"] < 0.7 * r["kv_bytes_full"]


def test_outputs_match_generate(model: LoadedModel, tmp_path: Path) -> None:
    """The runner's copy-per-press answers equal `generate` compressing the context inline."""
    cfg = EvalConfig(("niah_multiquery",), (160,), ("none", "knorm"), (0.5,), (), 1, max_new_tokens=3)
    rows = run_eval(model, cfg, tmp_path / "r.jsonl", progress=False)
    assert model.tokenizer is not None
    ex = make_example("niah_multiquery", model.tokenizer, 160, 0, 0, 0.5, model.max_context_len)
    questions = [q.text for q in ex.questions]
    for row in rows:
        spec = row["config"]["press"]
        press = None if spec == "none" else press_from_spec(spec, row["config"]["ratio"])
        want = generate(model, ex.context, max_tokens=3, press=press, questions=questions)
        assert row["outputs"] == [c.text for c in want]


def test_resume_runs_only_missing_keys(model: LoadedModel, tmp_path: Path) -> None:
    cfg = EvalConfig(("niah_single",), (160,), ("none", "knorm"), (0.25, 0.5), (2,), 2, max_new_tokens=2)
    out = tmp_path / "r.jsonl"
    first = run_eval(model, cfg, out, progress=False)
    lines = out.read_text().splitlines()
    # An interrupted run: three rows written, the fourth cut mid-line.
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    assert done_keys(out) == {row_key(json.loads(line)) for line in lines[:3]}
    second = run_eval(model, cfg, out, progress=False)
    assert [row_key(r) for r in second] == [row_key(r) for r in first[3:]]
    assert [r["outputs"] for r in second] == [r["outputs"] for r in first[3:]]
    kept = [json.loads(line) for line in out.read_text().splitlines() if line != lines[3][:25]]
    assert sorted(map(row_key, kept)) == sorted(_all_keys(cfg))
    assert run_eval(model, cfg, out, progress=False) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tasks=("haystack",)), "unknown task 'haystack'"),
        (dict(presses=("none", "nopress")), "unknown press 'nopress'"),
        (dict(kivi=(5,)), "KIVI bit widths"),
        (dict(ratios=(1.0,)), "ratios must be in"),
        (dict(baseline="vllm"), "unknown baseline 'vllm'; known baselines: kvpress"),
    ],
)
def test_bad_config(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        EvalConfig(**kwargs)


def test_resume_key_has_model_seed_and_engine(model: LoadedModel, tmp_path: Path) -> None:
    """Rows of another seed, model or engine in the same file are never taken for this run's."""
    cfg = EvalConfig(("niah_single",), (160,), ("none",), (0.5,), (), 1, seed=0, max_new_tokens=2)
    out = tmp_path / "r.jsonl"
    first = run_eval(model, cfg, out, progress=False)
    assert [row_key(r)[:3] for r in first] == [("kvengine", "tiny-llama", 0)]
    assert run_eval(model, cfg, out, progress=False) == []
    other_seed = run_eval(model, dataclasses.replace(cfg, seed=1), out, progress=False)
    assert [row_key(r)[:3] for r in other_seed] == [("kvengine", "tiny-llama", 1)]
    # The same file, read by a run of another model: none of its rows is done.
    lines = out.read_text().splitlines()
    renamed = [json.loads(line) for line in lines]
    for r in renamed:
        r["config"]["model"] = "other"
    out.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    assert len(run_eval(model, cfg, out, progress=False)) == 1
    # A kvpress row of the same setting does not count as kvengine's; a row with no engine does.
    theirs, legacy = json.loads(lines[0]), json.loads(lines[0])
    theirs["config"]["engine"] = "kvpress"
    del legacy["config"]["engine"]
    out.write_text(json.dumps(theirs) + "\n")
    assert len(run_eval(model, cfg, out, progress=False)) == 1
    out.write_text(json.dumps(legacy) + "\n")
    assert run_eval(model, cfg, out, progress=False) == []


def test_resume_key_has_depth(model: LoadedModel, tmp_path: Path) -> None:
    """Example 0 of a one-example run sits at depth 0.5, of a two-example run at 0.25: not the same example."""
    one = EvalConfig(("niah_single", "cwe"), (512,), ("none",), (0.5,), (), 1, max_new_tokens=2)
    out = tmp_path / "r.jsonl"
    assert [r["config"]["depth"] for r in run_eval(model, one, out, progress=False)] == [0.5, None]
    two = run_eval(model, dataclasses.replace(one, num_examples=2), out, progress=False)
    # cwe has no depth: its example 0 is the same example and is not run again.
    assert [(r["config"]["task"], r["config"]["example"], r["config"]["depth"]) for r in two] == [
        ("niah_single", 0, 0.25),
        ("niah_single", 1, 0.75),
        ("cwe", 1, None),
    ]


def test_jsonl_task_with_missing_field(model: LoadedModel, tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"context": "Ann is 31.", "question": "Ann?"}) + "\n")
    cfg = EvalConfig((str(path),), (160,), ("none",))
    with pytest.raises(InvalidRequestError, match=r"mine\.jsonl:1: missing field 'answers'"):
        run_eval(model, cfg, tmp_path / "r.jsonl", progress=False)


def test_jsonl_example_beyond_context(model: LoadedModel, tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"context": "x" * 1100, "question": "Q?", "answers": "x"}) + "\n")
    cfg = EvalConfig((str(path),), (160,), ("none",), max_new_tokens=2)
    with pytest.raises(InvalidRequestError, match=r"long example 0: \d+ tokens .* beyond model 'tiny-llama'"):
        run_eval(model, cfg, tmp_path / "r.jsonl", progress=False)


def test_length_beyond_context(model: LoadedModel, tmp_path: Path) -> None:
    cfg = EvalConfig(("niah_single",), (2048,), ("none",))
    with pytest.raises(InvalidRequestError, match=r"beyond model 'tiny-llama'.s context of 1024"):
        run_eval(model, cfg, tmp_path / "r.jsonl", progress=False)
    assert not (tmp_path / "r.jsonl").exists()


def test_jsonl_tasks(model: LoadedModel, tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    lines = [
        {"context": "Ann is 31 years old. " * 5, "question": q, "answers": a}
        for q, a in [("Ann?", "31"), ("B?", "x")]
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    cfg = EvalConfig((str(path),), (160,), ("none", "knorm"), (0.5,), max_new_tokens=2)
    rows = run_eval(model, cfg, tmp_path / "r.jsonl", progress=False)
    assert [(r["config"]["task"], r["config"]["press"], r["num_questions"]) for r in rows] == [
        ("mine", "none", 2),
        ("mine", "knorm", 2),
    ]


def _synthetic_rows() -> list[dict[str, Any]]:
    """Hand-made eval rows: a 2 x 2 needle grid under two settings plus a cwe row."""
    rows = []
    for press, ratio, kivi, held in [("none", 0.0, 0, 100), ("snapkv", 0.5, 0, 50), ("none", 0.0, 2, 20)]:
        for task, length, depth, value in [
            ("niah_single", 1024, 0.25, 1.0),
            ("niah_single", 1024, 0.75, 0.0),
            ("niah_single", 2048, 0.25, 1.0),
            ("niah_single", 2048, 0.75, 1.0),
            ("cwe", 1024, None, 0.5),
        ]:
            config = dict(
                task=task,
                length=length,
                example=0,
                press=press,
                ratio=ratio,
                kivi=kivi,
                depth=depth,
                model="m",
            )
            times = dict(prefill_s=1.0, compress_s=0.5, answer_s=0.5)
            rows.append(
                dict(bench="eval", value=value, config=config, kv_bytes=held, kv_bytes_full=100, **times)
            )
    return rows


def test_length_table_has_a_column_per_context_length() -> None:
    from kvengine.eval.report import length_table

    rows = _synthetic_rows()
    lines = length_table(rows).splitlines()
    assert lines[0] == "| press | ratio | accuracy @1024 | accuracy @2048 |"
    # At 1,024: needle 1.0 and 0.0, cwe 0.5; at 2,048: needle 1.0 twice. Same values under every setting.
    assert lines[2:] == [
        "| none | 0.00 | 0.500 | 1.000 |",
        "| snapkv | 0.50 | 0.500 | 1.000 |",
        "| kivi-2 | 0.00 | 0.500 | 1.000 |",
    ]
    assert length_table([r for r in rows if r["config"]["length"] == 1024]) == ""


def test_report_writes_table_and_plots(tmp_path: Path) -> None:
    from kvengine.eval.report import write_report
    from kvengine.eval.summary import needle_grid, summarize

    results = tmp_path / "r.jsonl"
    rows = _synthetic_rows()
    results.write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"bench": "eval", "val'
    )  # torn last line
    files = write_report(results, tmp_path / "docs")
    assert [f.name for f in files] == [
        "eval_report.md",
        "eval_accuracy_vs_kv_bytes.png",
        "eval_needle_grid.png",
    ]
    for f in files[1:]:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = files[0].read_text()
    # niah_single: 4 rows per setting, accuracy (1 + 0 + 1 + 1) / 4; cwe 0.5; "all" averages the 5 rows.
    # Then: of the full cache's accuracy; bytes / full; / 16-bit ("-": rows written before it was recorded).
    assert "| niah_single | none | 0.00 | - | 4 | 0.750 | 1.00 | 1.000 | - | 0.00 | 2.00 |" in table
    assert "| niah_single | snapkv | 0.50 | - | 4 | 0.750 | 1.00 | 0.500 | - |" in table
    assert "| cwe | none | 0.00 | 2 | 1 | 0.500 | 1.00 | 0.200 |" in table
    assert "| all | none | 0.00 | - | 5 | 0.700 |" in table
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(lines) == (1 + 9) + (1 + 3)  # the summary, then accuracy by length (3 settings, 2 lengths)
    assert "## Accuracy by context length" in table and "| none | 0.00 | 0.500 | 1.000 |" in table
    grid = needle_grid(rows)
    assert grid[("none", 0.0, 0)] == {
        (0.25, 1024): 1.0,
        (0.75, 1024): 0.0,
        (0.25, 2048): 1.0,
        (0.75, 2048): 1.0,
    }
    assert len(summarize(rows)) == 9


def test_report_without_grid_and_bad_files(tmp_path: Path) -> None:
    from kvengine.eval.report import write_report

    results = tmp_path / "r.jsonl"
    results.write_text(
        "".join(json.dumps(r) + "\n" for r in _synthetic_rows() if r["config"]["task"] == "cwe")
    )
    assert [f.name for f in write_report(results, tmp_path)] == [
        "eval_report.md",
        "eval_accuracy_vs_kv_bytes.png",
    ]
    with pytest.raises(InvalidRequestError, match="cannot read results"):
        write_report(tmp_path / "absent.jsonl", tmp_path)
    results.write_text('{"bench": "decode"}\n')
    with pytest.raises(InvalidRequestError, match="no `kvengine eval` rows"):
        write_report(results, tmp_path)
    results.write_text('{"bench": \n{"bench": "eval"}\n')
    with pytest.raises(InvalidRequestError, match=r"r\.jsonl:1: not valid JSON"):
        write_report(results, tmp_path)


def test_cli_eval_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvengine.cli import main

    for command in (["eval", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(command)
        assert exc.value.code == 0
    assert main(["eval", "--tasks", "nope", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "absent.jsonl")]) == 2
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _synthetic_rows()))
    assert main(["report", str(results), "--out-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "eval_report.md").exists() and (
        tmp_path / "out" / "eval_needle_grid.png"
    ).exists()


# --- the kvpress baseline -------------------------------------------------------------------------

# Where tools/kvpress_reference/README.md puts the kvpress venv; kvengine itself has no default.
KVPRESS_PYTHON = Path(os.environ.get("KVENGINE_KVPRESS_PYTHON", "/tmp/kvp-venv/bin/python"))


def test_baseline_runs_only_presses_kvpress_has() -> None:
    cfg = EvalConfig(
        presses=("none", "knorm", "h2o", "adakv:snapkv", "scissorhands"), ratios=(0.5,), kivi=(2,)
    )
    assert cfg.baseline_settings() == []
    with_baseline = dataclasses.replace(cfg, baseline="kvpress")
    assert with_baseline.baseline_settings() == [
        ("none", 0.0, 0),
        ("knorm", 0.5, 0),
        ("adakv:snapkv", 0.5, 0),
    ]
    assert press_kwargs("adakv:snapkv", 0.5) == (
        {"window_size": 64, "kernel_size": 5},
        {"alpha_safeguard": 0.2},
    )
    assert press_kwargs("streaming_llm", 0.25) == ({"n_sink": 4}, {})


def _twin(row: dict[str, Any], value: float, outputs: list[str], held: int, seconds: float) -> dict[str, Any]:
    twin = json.loads(json.dumps(row))
    twin["config"]["engine"] = "kvpress"
    twin.update(value=value, outputs=outputs, kv_bytes=held, prefill_s=seconds, compress_s=0.0, answer_s=0.0)
    return twin


def test_compare_table_pairs_the_same_examples(tmp_path: Path) -> None:
    from kvengine.eval.report import write_report
    from kvengine.eval.summary import summarize

    ours = [r for r in _synthetic_rows() if not r["config"]["kivi"]]
    for i, r in enumerate(ours):
        r["outputs"], r["config"]["example"] = ["a"], i  # one example per row, so each has its own key
    snap = [r for r in ours if r["config"]["press"] == "snapkv"]
    # kvpress answered two of the five snapkv examples (one alike, one not) and one "none" example.
    theirs = [_twin(snap[0], 0.0, ["b"], 100, 8.0), _twin(snap[1], 1.0, ["a"], 100, 8.0)]
    theirs.append(_twin(ours[0], 1.0, ["a"], 100, 4.0))
    rows = ours + theirs
    assert len(summarize(rows)) == len(summarize(ours))  # kvpress rows stay out of kvengine's table
    assert [s.num_examples for s in summarize(rows, "kvpress") if s.task == "all"] == [1, 2]
    table = compare_table(rows).splitlines()
    # snapkv pairs: kvengine scores 1.0 and 0.0 (snap[0], snap[1]), kvpress 0.0 and 1.0; held 50 vs 100 of 100;
    # kvengine's seconds are 2.0 per example, kvpress's 8.0.
    assert table[2] == "| none | 0.00 | 1 | 1.000 | 1.000 | 1.00 | 1.000 | 1.000 | 2.00 | 4.00 | 2.00 |"
    assert table[3] == "| snapkv | 0.50 | 2 | 0.500 | 0.500 | 0.50 | 0.500 | 1.000 | 2.00 | 8.00 | 4.00 |"
    assert len(table) == 4 and compare_table(ours) == ""
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(results, tmp_path)[0].read_text()
    assert "## kvengine vs kvpress" in report and table[3] in report


def test_time_tables_count_one_prefill_per_example_on_kvengine() -> None:
    def row(engine: str, example: int, press: str, prefill: float, compress: float) -> dict[str, Any]:
        config = dict(engine=engine, model="m", seed=0, task="niah_single", length=1024, example=example)
        config.update(press=press, ratio=0.5, kivi=0)
        return dict(config=config, prefill_s=prefill, compress_s=compress, answer_s=1.0)

    rows = []
    for example in (0, 1):
        for press in ("knorm", "snapkv"):
            # Example 1 was resumed between its two settings: kvengine prefilled its context twice.
            prefill = 2.0 if example == 0 or press == "knorm" else 2.5
            rows += [row("kvengine", example, press, prefill, 0.5), row("kvpress", example, press, 3.0, 0.0)]
    rows.append(row("kvengine", 2, "knorm", 2.0, 0.5))  # no kvpress twin: left out
    lines = time_tables(rows).splitlines()
    per_setting = next(line for line in lines if line.startswith("| 1024"))
    # kvengine 3.5 s per setting (4.0 for the resumed one), kvpress 4.0; medians, and the median ratio.
    assert per_setting == "| 1024 | 4 | 2.00 | 0.50 | 1.00 | 3.00 | 1.00 | 3.50 | 4.00 | 1.14 |"
    per_example = [line for line in lines if line.startswith("| 1024")][1]
    # kvengine: example 0 is 2.0 + 2 x 1.5 = 5.0, example 1 is 2.0 + 2.5 + 2 x 1.5 = 7.5; kvpress 8.0 each.
    assert per_example == "| 1024 | 2 | 2.0 | 6.2 | 8.0 | 1.28 |"
    assert time_tables([r for r in rows if r["config"]["engine"] == "kvengine"]) == ""


def test_baseline_errors_name_the_recipe(tmp_path: Path) -> None:
    import sys

    from kvengine.models import load

    tiny = tiny_model("llama")
    with pytest.raises(InvalidRequestError, match=r"does not exist; see tools/kvpress_reference/README\.md"):
        KvpressWorker(tmp_path / "nopython", tiny, 1).__enter__()
    with pytest.raises(InvalidRequestError, match="needs a model loaded from a directory; 'tiny-llama'"):
        KvpressWorker(Path(sys.executable), tiny, 1).__enter__()
    tiny.hf_model.save_pretrained(tmp_path / "tiny")
    saved = load(str(tmp_path / "tiny"), progress=False)
    # kvengine's own python exists but has no kvpress: the worker says so, and the message names the recipe.
    worker = KvpressWorker(Path(sys.executable), saved, 1)
    with pytest.raises(InvalidRequestError, match=r"kvpress is not usable under .*kvpress.*README\.md"):
        worker.__enter__()
    assert worker._worker is not None and worker._worker._proc is None  # the failed worker was stopped


@pytest.mark.model
@pytest.mark.skipif(
    not KVPRESS_PYTHON.is_file(),
    reason=f"no kvpress venv at {KVPRESS_PYTHON} (set KVENGINE_KVPRESS_PYTHON; recipe in tools/kvpress_reference)",
)
def test_kvpress_baseline_matches_kvengine(bundled: LoadedModel, tmp_path: Path) -> None:
    """kvpress's pipeline, on the same ids, keeps what kvengine keeps and answers alike (real kvpress)."""
    cfg = EvalConfig(
        ("niah_single",), (256,), ("none", "knorm", "adakv:knorm"), (0.5,), (), 1,
        max_new_tokens=12, baseline="kvpress", kvpress_python=KVPRESS_PYTHON,
    )  # fmt: skip
    rows = run_eval(bundled, cfg, tmp_path / "r.jsonl", progress=False)
    by = {(r["config"]["engine"], r["config"]["press"]): r for r in rows}
    assert set(by) == {(e, p) for e in ("kvengine", "kvpress") for p in cfg.presses}
    assert by["kvpress", "none"]["versions"]["kvpress"] == "0.5.5"
    for press in ("none", "knorm"):  # the same kept tokens and greedy decoding: the same answers
        assert by["kvpress", press]["outputs"] == by["kvengine", press]["outputs"], press
    ratio = {k: r["kv_bytes"] / r["kv_bytes_full"] for k, r in by.items()}
    assert ratio["kvpress", "knorm"] == pytest.approx(0.5, abs=0.01)
    assert ratio["kvengine", "knorm"] == pytest.approx(0.5, abs=0.01)
    # kvpress's AdaKV masks what it evicts and holds the whole cache; kvengine frees it.
    assert ratio["kvpress", "adakv:knorm"] == 1.0 and ratio["kvengine", "adakv:knorm"] < 0.55
    assert all(r["prefill_s"] > 0 and r["answer_s"] > 0 for r in rows)
    assert run_eval(bundled, cfg, tmp_path / "r.jsonl", progress=False) == []  # resumes, both engines done
