"""The fault suite: faults and abuse against a real `kvengine serve` process (issue 14), then a healthy server.

One server process runs a tiny random Llama saved to a directory, with a
byte-level tokenizer (ids = UTF-8 bytes), two API keys (tenants), the prefix
cache and a disk tier. Each test sends one fault from tenant A: a client that
leaves while its request is queued, in prefill, in decode, or not streaming;
degenerate sampling; stop lists and JSON built to scale work; slow headers
and bodies; and, last, SIGTERM under load, after which a new process is
started on the same disk tier. After every fault, the next normal request of
tenant B must succeed with the greedy output of a cold in-process run of the
same model, and /metrics must show no block referenced by a request (pool
blocks used == blocks only the prefix cache holds).

Each test records a row: fault, requests sent, failed (answers that break the
contract: a 5xx other than a shutdown's 503, a stream without `[DONE]`, a
connection the server dropped), leaked blocks, outputs equal. With
KVENGINE_FAULT_REPORT=PATH the rows are appended to PATH as JSON lines
(docs/benchmarks.md, "Faults survived"). Marked `faults`: `pytest -m faults`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import tiny_model

from kvengine.bench.serving.launch import metric, scrape_metrics, settled_blocks_in_use
from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.models import load
from kvengine.results import append_rows, machine_info, versions

pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("fault_suite")]

A, B = "tenant-a", "tenant-b"
PROBE = "the next request of another tenant"
LONG = 900  # output tokens of a request that must still be running when the test acts
GRACE_S = 3.0
SHORT = "a short request, number {}, finished in the grace period"
REQUEST_LINE = b"POST /v1/completions HTTP/1.1\r\nHost: kvengine\r\n"
HEAD = REQUEST_LINE + f"Authorization: Bearer {A}\r\n".encode()  # a request of tenant A, headers unfinished
ROWS: list[dict[str, Any]] = []


def _byte_tokenizer() -> Any:
    """A Hugging Face tokenizer whose ids are the UTF-8 bytes of the text (GPT-2's byte alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    tok = Tokenizer(models.BPE({c: b for b, c in chars.items()}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-bytes")
    tiny_model("llama").hf_model.save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cold(model_dir: Path) -> Callable[[str, int], str]:
    """Greedy text of a fresh in-process engine over the same saved model: the reference."""
    model = load(str(model_dir), progress=False)
    assert model.tokenizer is not None

    def run(prompt: str, max_tokens: int) -> str:
        engine = Engine(model, CacheConfig(block_size=4, max_kv_bytes=1 << 22))
        ids = list(prompt.encode())
        out = engine.generate([ids], SamplingParams(max_tokens=max_tokens))[0].output_ids
        return str(model.tokenizer.decode(out))  # type: ignore[union-attr]

    return run


@dataclass
class Served:
    url: str
    proc: subprocess.Popen
    log: Path

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


@contextlib.contextmanager
def _serve(model_dir: Path, disk_dir: Path, log: Path) -> Iterator[Served]:
    """`kvengine serve` on a free loopback port until the block ends (Ctrl-C, then kill)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "kvengine.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--api-key", A, "--api-key", B, "--block-size", "4", "--max-kv-bytes", str(1 << 22)]
    cmd += ["--prefix-cache", "--tiers", "disk", "--disk-tier-dir", str(disk_dir)]
    cmd += ["--max-num-seqs", "4", "--max-step-tokens", "8", "--shutdown-grace-s", str(GRACE_S)]
    cmd += ["--header-timeout-s", "1", "--body-timeout-s", "1"]
    # The disk tier's secret, the same for both processes of the suite.
    env = {**os.environ, "KVENGINE_TIER_SECRET": "fault-suite-secret-0123456789"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    served = Served(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 120
        while not _ready(served.url):
            assert proc.poll() is None and time.monotonic() < deadline, served.tail()
            time.sleep(0.2)
        yield served
    finally:
        for stop in (lambda: proc.send_signal(signal.SIGINT), proc.kill):
            if proc.poll() is None:
                stop()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(15)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("fault-suite")
    with _serve(model_dir, folder / "kv-blocks", folder / "server.log") as served:
        yield served
    if rows_path := os.environ.get("KVENGINE_FAULT_REPORT"):
        meta = {"machine": machine_info(), "versions": versions(), "time": time.strftime("%Y-%m-%d")}
        append_rows(Path(rows_path), [{**row, **meta} for row in ROWS])


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _post(url: str, body: dict[str, Any], key: str = A, timeout: float = 30) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, headers=_headers(key), timeout=timeout)


def _after_fault(server: Served, cold: Callable[[str, int], str], fault: str, sent: int, failed: int) -> None:
    """Tenant B's next request succeeds, equal to a cold run; no block leaked; record the row."""
    r = _post(server.url, {"prompt": PROBE, "max_tokens": 8, "temperature": 0}, key=B)
    assert r.status_code == 200, (r.text, server.tail())
    equal = r.json()["choices"][0]["text"] == cold(PROBE, 8)
    leaked = settled_blocks_in_use(server.url, None, 0.0)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    row = {
        "fault": fault,
        "requests": sent + 1,
        "failed": failed,
        "leaked_blocks": leaked,
        "outputs_equal": equal,
    }
    ROWS.append(row)
    assert failed == 0 and leaked == 0 and equal, row


def _counter(server: Served, name: str) -> float:
    return metric(scrape_metrics(server.url), name) or 0.0


class _Stream:
    """A streaming request on a raw socket, read in a thread; `close()` leaves at once, mid-stream.

    `lines` are its `data:` payloads; `cut` says the server closed before `[DONE]`.
    """

    def __init__(self, url: str, body: dict[str, Any], key: str = A) -> None:
        self.lines: list[str] = []
        self.status: int | None = None
        self.cut = False
        self._leave = threading.Event()
        data = json.dumps({**body, "stream": True}).encode()
        head = f"Authorization: Bearer {key}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        request = REQUEST_LINE + head.encode() + data
        self._thread = threading.Thread(target=self._read, args=(url, request))
        self._thread.start()

    def _read(self, url: str, request: bytes) -> None:
        host, port = url.removeprefix("http://").split(":")
        buffer = b""
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(request)
            sock.settimeout(0.05)
            while not self._leave.is_set():
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                buffer += chunk
                lines = buffer.split(b"\n")
                buffer = lines.pop()  # an incomplete line waits for the rest
                self._parse(lines)
        self.cut = not self._leave.is_set() and not self.done

    def _parse(self, lines: list[bytes]) -> None:
        for line in lines:
            if self.status is None and line.startswith(b"HTTP/1.1 "):
                self.status = int(line.split()[1])
            elif line.startswith(b"data: "):  # whole events: each is one chunk of the response
                self.lines.append(line[6:].decode().rstrip("\r"))

    def close(self) -> None:
        self._leave.set()
        self.join()

    def join(self) -> None:
        self._thread.join(timeout=60)

    @property
    def done(self) -> bool:
        return bool(self.lines) and self.lines[-1] == "[DONE]"


def _wait(cond: Callable[[], bool], timeout_s: float = 30) -> None:
    """Poll until `cond()`; the deadline only bounds a failing test."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _unique_prompt(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))


def test_disconnect_while_queued(server: Served, cold: Callable[[str, int], str]) -> None:
    """Every slot taken (--max-num-seqs 4): a fifth request waits; its client leaves; it never runs."""
    long = {"prompt": "hold a slot", "max_tokens": LONG, "ignore_eos": True, "temperature": 0}
    blockers = [_Stream(server.url, long) for _ in range(4)]
    _wait(lambda: all(len(s.lines) >= 1 for s in blockers))
    prefilled = _counter(server, "prefill_tokens_total")
    queued = _Stream(server.url, {"prompt": _unique_prompt(64, 1), "max_tokens": 4})
    _wait(lambda: queued.status is not None)  # admitted to the engine's queue: the 200 is out
    queued.close()
    time.sleep(0.3)  # the abort reaches the engine at its next step boundary
    for s in blockers:
        s.close()
    _wait(lambda: settled_blocks_in_use(server.url, None, 0.0, timeout_s=0.1) == 0)
    assert _counter(server, "prefill_tokens_total") == prefilled  # the queued prompt was never computed
    failed = sum(s.status != 200 or s.cut for s in [*blockers, queued])
    _after_fault(server, cold, "client leaves while queued (4 running)", 5, failed)


def test_disconnect_during_prefill(server: Served, cold: Callable[[str, int], str]) -> None:
    """A 1,000-token prompt takes 125 steps of 8 tokens; its client leaves after the first few."""
    prompt = _unique_prompt(1000, 2)
    before = _counter(server, "prefill_tokens_total")
    stream = _Stream(server.url, {"prompt": prompt, "max_tokens": 4})
    _wait(lambda: _counter(server, "prefill_tokens_total") >= before + 16, timeout_s=60)
    stream.close()
    _wait(lambda: settled_blocks_in_use(server.url, None, 0.0, timeout_s=0.1) == 0)
    time.sleep(0.3)  # a prefill that went on would show now
    assert _counter(server, "prefill_tokens_total") - before < len(prompt)
    assert not stream.lines  # no token came out
    _after_fault(server, cold, "client leaves during prefill", 1, int(stream.status != 200 or stream.cut))


def test_disconnect_during_decode(server: Served, cold: Callable[[str, int], str]) -> None:
    before = _counter(server, "completion_tokens_total")
    stream = _Stream(server.url, {"prompt": "decode then leave", "max_tokens": LONG, "ignore_eos": True})
    _wait(lambda: len(stream.lines) >= 5)
    stream.close()
    _wait(lambda: settled_blocks_in_use(server.url, None, 0.0, timeout_s=0.1) == 0)
    _wait(lambda: _counter(server, "completion_tokens_total") > before)  # counted once the request ended
    assert _counter(server, "completion_tokens_total") - before < LONG
    _after_fault(server, cold, "client leaves during decode", 1, int(stream.status != 200 or stream.cut))


def test_client_leaves_a_non_streaming_request(server: Served, cold: Callable[[str, int], str]) -> None:
    before = _counter(server, "completion_tokens_total")
    body = {"prompt": "wait for it", "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        _post(server.url, body, timeout=1.0)
    _wait(lambda: settled_blocks_in_use(server.url, None, 0.0, timeout_s=0.1) == 0)
    _wait(lambda: _counter(server, "completion_tokens_total") > before)
    assert _counter(server, "completion_tokens_total") - before < LONG  # aborted, not run to the end
    _after_fault(server, cold, "client leaves a non-streaming request", 1, 0)


@pytest.mark.parametrize(
    ("fault", "bodies"),
    [
        (
            "degenerate sampling (temperature 1e-38, top_p 1e-300, ...)",
            [
                {"prompt": "hi", "max_tokens": 4, "temperature": 1e-38},
                {"prompt": "hi", "max_tokens": 4, "temperature": 1e-300, "top_k": 3},
                {"prompt": "hi", "max_tokens": 4, "temperature": 1.0, "top_p": 1e-300},
                {"prompt": "hi", "max_tokens": 4, "temperature": 1e-30, "top_p": 1e-30, "stream": True},
            ],
        ),
        (
            "huge stop lists (200,000 strings; one of 100,000 characters)",
            [
                {"prompt": "hi", "max_tokens": 2, "stop": ["ab"] * 200_000},
                {"prompt": "hi", "max_tokens": 2, "stop": ["x" * 100_000]},
            ],
        ),
        (
            "deep JSON and lone surrogates",
            [
                b"[" * 100_000,
                b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                b'{"prompt": "a\\ud800"}',
            ],
        ),
    ],
    ids=["sampling", "stop", "json"],
)
def test_bad_requests_get_their_answer(
    server: Served, cold: Callable[[str, int], str], fault: str, bodies: list[Any]
) -> None:
    """Each gets a 200 or a 4xx with OpenAI's error body, never a 5xx, and the engine goes on."""
    failed = 0
    for body in bodies:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {**_headers(A), "Content-Type": "application/json"}
        r = httpx.post(server.url + "/v1/completions", content=content, headers=headers, timeout=30)
        ok = r.status_code == 200 or (400 <= r.status_code < 500 and r.json()["error"]["message"])
        if r.status_code == 200 and isinstance(body, dict) and body.get("stream"):
            ok = r.text.rstrip().endswith("data: [DONE]")
        failed += not ok
    _after_fault(server, cold, fault, len(bodies), failed)


def _drip(url: str, first: bytes, drip: bytes, limit_s: float = 10.0) -> tuple[bytes, float]:
    """Send `first`, then `drip` every 0.1 s until the server closes; (its answer, seconds taken)."""
    host, port = url.removeprefix("http://").split(":")
    start, received = time.monotonic(), b""
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(0.1)
        sock.sendall(first)
        while time.monotonic() - start < limit_s:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    sock.sendall(drip)
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - start


@pytest.mark.parametrize(
    ("fault", "first", "drip"),
    [
        ("slow headers (slow loris) and silent connections, 20 each", HEAD, b"X-Slow: 1\r\n"),
        ("slow bodies, 20", HEAD + b"Content-Type: application/json\r\nContent-Length: 9000\r\n\r\n{", b" "),
    ],
    ids=["headers", "body"],
)
def test_slow_clients_are_cut(
    server: Served, cold: Callable[[str, int], str], fault: str, first: bytes, drip: bytes
) -> None:
    """--header-timeout-s 1, --body-timeout-s 1: every slow client is answered 408 and cut within seconds."""
    clients = [(first, drip)] * 20 + ([(b"", b"")] * 20 if first == HEAD else [])
    results: list[tuple[bytes, float]] = [(b"", 0.0)] * len(clients)

    def client(i: int) -> None:
        results[i] = _drip(server.url, *clients[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    r = _post(server.url, {"prompt": "meanwhile", "max_tokens": 2})  # others are served meanwhile
    for t in threads:
        t.join()
    failed = int(r.status_code != 200)
    for (got, took), (sent, _) in zip(results, clients, strict=True):
        failed += took > 5.0 or (bool(sent) and not got.startswith(b"HTTP/1.1 408"))
    _after_fault(server, cold, fault, len(clients) + 1, failed)


def test_sigterm_under_load(
    server: Served, cold: Callable[[str, int], str], model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGTERM with requests in flight: short ones finish, the rest end with an error; tiers are flushed.

    Runs last: it stops the module's server. A new process on the same disk
    tier then serves tenant B's request, and tenant A's finished prompts come
    from the disk: the grace period's writes were flushed.
    """
    # --max-num-seqs 4: three long requests run, the short ones take turns in the fourth slot.
    shorts = [_Stream(server.url, {"prompt": SHORT.format(i), "max_tokens": 4}) for i in range(4)]
    longs = [
        _Stream(server.url, {"prompt": f"long {i}", "max_tokens": LONG, "ignore_eos": True}) for i in range(2)
    ]
    plain: list[httpx.Response | None] = []
    body = {"prompt": "long, not streamed", "max_tokens": LONG, "ignore_eos": True}
    waiter = threading.Thread(target=lambda: plain.append(_post(server.url, body, timeout=60)))
    waiter.start()
    _wait(lambda: all(s.status is not None for s in [*shorts, *longs]))
    server.proc.send_signal(signal.SIGTERM)
    _wait(lambda: httpx.get(server.url + "/ready", timeout=5).status_code == 503, timeout_s=5)
    refused = _post(server.url, {"prompt": "too late", "max_tokens": 2}, key=B)
    for s in [*shorts, *longs]:
        s.join()
    waiter.join(timeout=60)
    assert server.proc.wait(GRACE_S + 30) == 0, server.tail()
    assert "Traceback" not in server.log.read_text(errors="replace"), server.tail()
    ended = [s for s in [*shorts, *longs] if s.done and "error" in json.loads(s.lines[-2])]
    failed = sum(not s.done or s.cut for s in [*shorts, *longs]) + int(refused.status_code != 503)
    failed += int(not plain or plain[0] is None or plain[0].status_code not in (200, 503))
    num_503 = sum(
        r is not None and r.status_code == 503 and r.json()["error"]["code"] == "shutdown" for r in plain
    )
    assert all(s.done and s not in ended for s in shorts), [s.lines[-2:] for s in shorts]
    assert ended and all(json.loads(s.lines[-2])["error"]["code"] == "shutdown" for s in ended)
    folder = tmp_path_factory.mktemp("fault-suite-restart")
    with _serve(model_dir, server.log.parent / "kv-blocks", folder / "server.log") as again:
        r = _post(again.url, {"prompt": SHORT.format(0), "max_tokens": 4, "temperature": 0})
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # from the disk tier
        fault = f"SIGTERM under load ({len(ended)} of 6 streams, {num_503} of 1 non-streaming ended by it)"
        _after_fault(again, cold, fault, 9, failed)
