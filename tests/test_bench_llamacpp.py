"""The llama.cpp baseline of `bench decode|throughput`: worker, client protocol, errors, options.

Everything but the last test runs without llama.cpp: the worker's batching is checked
against a fake llama_cpp library whose "model" is a known function of each sequence's
history (so parallel sequences must come out as if each ran alone), and the client
against fake worker processes. The last test runs the real llama.cpp venv when there
is one and checks that llama.cpp's greedy tokens equal kvengine's on the same weights.
"""

from __future__ import annotations

import ctypes
import inspect
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kvengine.bench import llamacpp_worker
from kvengine.bench.llamacpp import LlamaCppBaseline, LlamaCppWorker, default_python
from kvengine.cli import main
from kvengine.errors import InvalidRequestError

VOCAB = 50


def next_token(history: list[int]) -> int:
    """The fake model's greedy choice after `history` (prompt and tokens so far)."""
    return (sum(history) * 7 + len(history)) % VOCAB


class FakeLlamaCpp:
    """The few llama_cpp functions the worker calls; checks positions and sequence ids like llama.cpp."""

    LLAMA_FLASH_ATTN_TYPE_DISABLED = 0

    def __init__(self) -> None:
        self.histories: dict[int, list[int]] = {}
        self.rows: list[Any] = []
        self.contexts: list[SimpleNamespace] = []

    def llama_model_default_params(self) -> SimpleNamespace:
        return SimpleNamespace()

    def llama_model_load_from_file(self, path: bytes, params: Any) -> str:
        return "model"

    def llama_model_get_vocab(self, model: str) -> str:
        return "vocab"

    def llama_vocab_n_tokens(self, vocab: str) -> int:
        return VOCAB

    def llama_context_default_params(self) -> SimpleNamespace:
        return SimpleNamespace()

    def llama_init_from_model(self, model: str, params: SimpleNamespace) -> SimpleNamespace:
        self.histories = {}
        self.contexts.append(params)
        return params

    def llama_free(self, ctx: Any) -> None:
        pass

    def llama_batch_init(self, n_tokens: int, embd: int, n_seq_max: int) -> SimpleNamespace:
        fields = ("token", "pos", "n_seq_id", "logits")
        batch = SimpleNamespace(n_tokens=0, seq_id=[[0] for _ in range(n_tokens)])
        for name in fields:
            setattr(batch, name, [0] * n_tokens)
        return batch

    def llama_batch_free(self, batch: Any) -> None:
        pass

    def llama_decode(self, ctx: Any, batch: SimpleNamespace) -> int:
        assert batch.n_tokens <= ctx.n_batch
        self.rows = []
        for i in range(batch.n_tokens):
            history = self.histories.setdefault(batch.seq_id[i][0], [])
            assert batch.pos[i] == len(history) and batch.n_seq_id[i] == 1
            history.append(batch.token[i])
            logits = (ctypes.c_float * VOCAB)()
            logits[next_token(history)] = 1.0
            self.rows.append(logits if batch.logits[i] else None)
        return 0

    def llama_get_logits_ith(self, ctx: Any, i: int) -> Any:
        assert self.rows[i] is not None, f"logits of batch row {i} were not asked for"
        return ctypes.cast(self.rows[i], ctypes.POINTER(ctypes.c_float))


def reference(prompt: list[int], new_tokens: int) -> list[int]:
    history = list(prompt)
    for _ in range(new_tokens):
        history.append(next_token(history))
    return history[len(prompt) :]


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_parallel_sequences_decode_as_each_alone(precision: str) -> None:
    """Packed prefill and batched decode steps give every prompt the tokens it gets on its own."""
    lib = FakeLlamaCpp()
    runner = llamacpp_worker.Runner(lib, "model.gguf", precision, threads=2)
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    outputs, times = runner.generate(prompts, new_tokens=6)
    assert outputs == [reference(p, 6) for p in prompts]
    assert len(times) == 1 + 6 and times == sorted(times)  # the start, then after each step
    ctx = lib.contexts[-1]
    assert (ctx.n_ctx, ctx.n_batch, ctx.n_seq_max, ctx.n_threads) == (3 * (7 + 6), 14, 3, 2)
    assert ctx.type_k == ctx.type_v == llamacpp_worker.PRECISIONS[precision][1]  # the KV cache too


def test_worker_answers_decode_and_throughput() -> None:
    runner = llamacpp_worker.Runner(FakeLlamaCpp(), "model.gguf", "f32", threads=1)
    reply = llamacpp_worker.answer(runner, {"id": 4, "op": "decode", "prompt_ids": [1, 2], "new_tokens": 5})
    assert reply["id"] == 4 and reply["output_ids"] == reference([1, 2], 5)
    assert reply["prefill_s"] > 0 and reply["decode_tokens_per_s"] > 0
    prompts = [[1, 2], [3]]
    reply = llamacpp_worker.answer(runner, {"id": 5, "op": "throughput", "prompts": prompts, "new_tokens": 3})
    assert reply["output_ids"] == [reference(p, 3) for p in prompts] and reply["mode"] == "batched"
    with pytest.raises(ValueError, match="unknown op 'train'; known: decode, throughput"):
        llamacpp_worker.answer(runner, {"id": 6, "op": "train", "new_tokens": 1})


def test_worker_start_errors_are_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert llamacpp_worker.main(["model.gguf", "/tmp", "f16", "2"]) == 3
    assert (
        capsys.readouterr().out
        == '{"error": "ValueError: unknown precision \'f16\'; known: f32, bf16, q8_0, q4_1"}\n'
    )
    assert llamacpp_worker.main(["model.gguf"]) == 2
    assert "usage: llamacpp_worker.py" in capsys.readouterr().out


def needs_bundled_gguf() -> None:
    """Skip unless the bundled GGUF, which the client starts every worker with, is installed."""
    from kvengine.bench.llamacpp import source_gguf
    from kvengine.errors import ModelNotFoundError

    try:
        source_gguf("smollm2-135m")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))


def fake_python(tmp_path: Path, worker_body: str) -> Path:
    """An executable standing in for the llama.cpp venv's python: runs `worker_body` under this python."""
    script = tmp_path / "fake_worker.py"
    script.write_text("import json, sys\n" + inspect.cleandoc(worker_body) + "\n")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(0o755)
    return python


def test_client_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"does not exist; see tools/llamacpp_reference/README\.md"):
        LlamaCppWorker(LlamaCppBaseline(tmp_path / "nopython"), "smollm2-135m").__enter__()
    with pytest.raises(InvalidRequestError, match=r"needs a bundled GGUF model .*'/some/dir' is not one"):
        LlamaCppWorker(LlamaCppBaseline(Path(sys.executable)), "/some/dir").__enter__()
    with pytest.raises(InvalidRequestError, match=r"unknown llama\.cpp precision 'f16'; known: f32, bf16"):
        LlamaCppBaseline(Path(sys.executable), "f16")


def test_client_without_llama_cpp_names_the_recipe(tmp_path: Path) -> None:
    """kvengine's own python exists but has no llama_cpp: the real worker says so, the client names the recipe."""
    needs_bundled_gguf()
    worker = LlamaCppWorker(LlamaCppBaseline(Path(sys.executable)), "smollm2-135m", tmp_path)
    with pytest.raises(
        InvalidRequestError, match=r"not usable under .*No module named 'llama_cpp'.*README\.md"
    ):
        worker.__enter__()
    assert worker._worker is not None and worker._worker._proc is None  # the failed worker was stopped


def test_client_speaks_the_protocol(tmp_path: Path) -> None:
    needs_bundled_gguf()
    python = fake_python(
        tmp_path,
        """
        _, isolated, worker, source, cache_dir, precision, threads = sys.argv
        print(json.dumps({"ready": True, "versions": {"llama-cpp-python": "9.9"}, "args": sys.argv[1:]}))
        sys.stdout.flush()
        for line in sys.stdin:
            r = json.loads(line)
            if r["op"] == "decode":
                out = {"id": r["id"], "prefill_s": 0.5, "decode_tokens_per_s": 9.0, "output_ids": r["prompt_ids"]}
            else:
                out = {"id": r["id"], "error": "RuntimeError: llama_decode returned 1"}
            print(json.dumps(out))
            sys.stdout.flush()
        """,
    )
    with LlamaCppWorker(LlamaCppBaseline(python, "bf16", threads=3), "smollm2-135m", tmp_path) as worker:
        assert worker.versions == {"llama-cpp-python": "9.9"}
        isolated, script, source, cache_dir, precision, threads = worker.ready["args"]
        assert (
            isolated == "-P"
            and script.endswith("kvengine/bench/llamacpp_worker.py")
            and source.endswith(".gguf")
        )
        assert (cache_dir, precision, threads) == (str(tmp_path), "bf16", "3")
        assert worker.decode([5, 6], 2)["output_ids"] == [5, 6]
        with pytest.raises(InvalidRequestError, match=r"llama\.cpp failed on throughput: .*returned 1"):
            worker.throughput([[5]], 2)


def test_client_reports_a_dead_worker(tmp_path: Path) -> None:
    needs_bundled_gguf()
    python = fake_python(tmp_path, 'sys.exit("GGML_ASSERT failed: out of memory")')
    with pytest.raises(InvalidRequestError, match="stopped: GGML_ASSERT failed: out of memory"):
        LlamaCppWorker(LlamaCppBaseline(python), "smollm2-135m", tmp_path).__enter__()


@pytest.mark.parametrize("bench", ["decode", "throughput"])
def test_baseline_options_reach_the_runner(
    bench: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvengine.bench import decode, throughput

    module, runner = (
        (decode, "run_decode_bench") if bench == "decode" else (throughput, "run_throughput_bench")
    )
    calls: list[Any] = []
    monkeypatch.setattr(module, runner, lambda *a, **kw: calls.append(kw["llamacpp"]) or [])
    files = ["--out", str(tmp_path / "r.jsonl"), "--report", str(tmp_path / "r.md")]
    assert main(["bench", bench, *files]) == 0
    python = tmp_path / "py"
    options = ["--baseline", "llamacpp", "--llamacpp-python", str(python), "--llamacpp-precision", "bf16"]
    assert main(["bench", bench, *options, "--llamacpp-threads", "3", *files]) == 0
    assert main(["bench", bench, "--baseline", "llamacpp", *files]) == 0
    assert calls == [
        None,
        LlamaCppBaseline(python, "bf16", 3),
        LlamaCppBaseline(default_python(), "f32", 0),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "decode", "--baseline", "kvpress"], "invalid choice: 'kvpress'"),
        (["bench", "throughput", "--llamacpp-precision", "f16"], "invalid choice: 'f16'"),
        (["bench", "decode", "--llamacpp-threads", "0"], "must be >= 1"),
    ],
)
def test_bad_baseline_options_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.model
@pytest.mark.skipif(
    not default_python().is_file(),
    reason=f"no llama.cpp venv at {default_python()} (bash tools/llamacpp_reference/setup.sh)",
)
def test_llamacpp_greedy_tokens_equal_kvengines(tmp_path: Path) -> None:
    """Real llama.cpp on the same weights, f32: the same greedy tokens as kvengine, alone and in parallel."""
    from kvengine.bench.decode import run_decode_bench
    from kvengine.bench.throughput import measure_throughput
    from kvengine.models import load

    baseline = LlamaCppBaseline(default_python(), "f32")
    rows = run_decode_bench(
        "smollm2-135m", [64], 8, 1, tmp_path / "r.jsonl", tmp_path / "r.md", llamacpp=baseline
    )
    llama_rows = [r for r in rows if r["config"]["system"] == "llamacpp"]
    assert len(llama_rows) == 2 and all(r["config"]["tokens_match"] for r in llama_rows)
    assert "llama.cpp tokens = kvengine's" in (tmp_path / "r.md").read_text()
    model = load("smollm2-135m", dtype="float32", progress=False)
    with LlamaCppWorker(baseline, "smollm2-135m") as worker:
        res = measure_throughput(
            model, [1, 3], prompt_len=32, new_tokens=6, baseline_requests=1, llamacpp=worker
        )
    assert res["llamacpp_match"] == {1: True, 3: True}
