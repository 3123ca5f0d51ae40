"""lm-evaluation-harness against a real `kvengine serve` process, checked against lm-eval's own HF backend.

Two small local tasks (tests/data/lm_eval: YAML configs and JSON-lines data,
no download) run twice through lm-eval 0.4's Python API: once with its
`local-completions` model against `kvengine serve smollm2-135m --dtype
float32` in its default mode (prompts sent as token-id lists, the bundled
model's own tokenizer directory as `tokenizer`), once with its `hf` model on
the same converted weights (float32, CPU, batch size 1). The reference is the
second run. Compared per sample: the generated strings of the generate_until
task (greedy arithmetic, exact_match), and for the multiple_choice task each
choice's log-likelihood (within 1e-4, summed over its tokens), its is-greedy
flag and the choice picked; then the aggregate scores, exactly.

Marked `model` (the bundled SmolLM2-135M) and `harness` (needs the `harness`
extra: `pip install -e '.[harness]'`). Run the same by hand with the command in
README.md ("Serving, prefix cache, evaluation").
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from kvengine.config import DEFAULT_MODEL, default_cache_dir
from kvengine.models import convert

pytestmark = [pytest.mark.model, pytest.mark.harness, pytest.mark.xdist_group("lm_eval")]

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lm_eval"  # the YAML's data_files are relative to ROOT
GENERATE, CHOICE = "kvengine_arithmetic", "kvengine_multiple_choice"
LOGLIKELIHOOD_TOL = 1e-4  # a choice's log-likelihood: a sum of fp32 log-softmaxes (they agree to ~1e-7 here)
STARTUP_S = 300  # a cold start converts the bundled GGUF first


@contextlib.contextmanager
def _serve(log: Path) -> Iterator[str]:
    """`kvengine serve` of the bundled model in float32 on a free loopback port; yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "kvengine.cli", "serve", DEFAULT_MODEL, "--dtype", "float32"]
    cmd += ["--port", str(port), "--max-kv-bytes", str(64 << 20)]
    # One torch thread, as conftest gives each xdist worker: on 2 shared cores more threads thrash.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while not _ready(url):
            tail = log.read_text(errors="replace")[-3000:]
            assert proc.poll() is None, f"kvengine serve exited:\n{tail}"
            assert time.monotonic() < deadline, f"kvengine serve not ready after {STARTUP_S} s:\n{tail}"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _evaluate(model: str, model_args: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of both local tasks, greedy, with every sample logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(  # type: ignore[no-any-return]
        model=model,
        model_args=model_args,
        tasks=[GENERATE, CHOICE],
        task_manager=TaskManager(include_path=str(TASKS)),
        batch_size=1,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,  # no standard errors: they are not compared, and cost seconds
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results through `kvengine serve`, results through lm-eval's HF backend) of both tasks."""
    log = tmp_path_factory.mktemp("lm-eval") / "server.log"
    with pytest.MonkeyPatch.context() as mp:
        # Nothing may be fetched: every model, tokenizer and data file here is local.
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.chdir(ROOT)
        with _serve(log) as url:
            model_dir = convert.converted_dir(default_cache_dir(), DEFAULT_MODEL)  # the server converted it
            assert convert.is_converted(model_dir), model_dir
            served = _evaluate(
                "local-completions",
                {
                    "base_url": f"{url}/v1/completions",
                    "model": DEFAULT_MODEL,
                    "tokenizer": str(model_dir),
                    "tokenizer_backend": "huggingface",
                    "max_retries": 1,  # a refused request fails the run at once, not after retries
                },
            )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the server's
        try:
            reference = _evaluate("hf", {"pretrained": str(model_dir), "dtype": "float32"})
        finally:
            torch.set_num_threads(threads)
    return served, reference


def _samples(results: dict[str, Any], task: str) -> list[dict[str, Any]]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_generate_until_in_token_id_mode_equals_the_hf_backend(
    runs: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    served, reference = runs
    got, want = _samples(served, GENERATE), _samples(reference, GENERATE)
    assert [s["doc_id"] for s in got] == [s["doc_id"] for s in want] and len(got) >= 10
    for g, w in zip(got, want, strict=True):
        assert g["resps"] == w["resps"], (g["doc_id"], g["arguments"], g["resps"], w["resps"])
        assert g["filtered_resps"] == w["filtered_resps"]
        assert g["exact_match"] == w["exact_match"]
    score = served["results"][GENERATE]["exact_match,strip"]
    assert score == reference["results"][GENERATE]["exact_match,strip"]
    print(f"{GENERATE}: exact_match {score} over {len(got)} questions, both ways")
    # The task separates right from wrong answers: equal scores are not two empty outputs.
    assert 0 < score < 1, score


def test_multiple_choice_equals_the_hf_backend(runs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    served, reference = runs
    got, want = _samples(served, CHOICE), _samples(reference, CHOICE)
    assert [s["doc_id"] for s in got] == [s["doc_id"] for s in want] and len(got) >= 10
    for g, w in zip(got, want, strict=True):
        ours, theirs = g["filtered_resps"], w["filtered_resps"]  # one (log-likelihood, is_greedy) per choice
        assert len(ours) == len(theirs) > 1
        for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, theirs, strict=True):
            assert math.isfinite(ll) and ll < 0
            assert abs(ll - ref_ll) <= LOGLIKELIHOOD_TOL, (g["doc_id"], ours, theirs)
            assert greedy == ref_greedy, (g["doc_id"], ours, theirs)
        assert (g["acc"], g["acc_norm"]) == (w["acc"], w["acc_norm"]), g["doc_id"]
    for metric in ("acc,none", "acc_norm,none"):
        score = served["results"][CHOICE][metric]
        assert score == reference["results"][CHOICE][metric], metric
        print(f"{CHOICE}: {metric} {score} over {len(got)} questions, both ways")
        assert 0 < score < 1, (metric, score)
