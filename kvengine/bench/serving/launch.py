"""The server side of `kvengine bench serve`: launching `kvengine serve`, reading /metrics and memory.

`launched_server` starts `kvengine serve` as a child process on a free
loopback port, waits for /health, and stops it afterwards (Ctrl-C first, then
harder, each step bounded). `scrape_metrics` reads a Prometheus text page;
the leak check compares the pool's referenced blocks (used minus those only
the prefix cache holds) before and after a run. Memory is read from
/proc/PID/status, so it is measured on Linux only (None elsewhere). Nothing
here generates load; that is load.py.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvengine.bench.serving.load import ServerUnreachableError


@dataclass(frozen=True)
class LaunchConfig:
    """How to start the server for a run: model, extra `kvengine serve` flags, where its log goes."""

    model: str
    serve_args: tuple[str, ...] = ()  # e.g. ("--prefix-cache",); host and port are chosen here
    log_path: Path = Path("bench_serve_server.log")
    startup_timeout_s: float = 900.0  # loading (and converting, the first time) a model takes a while
    stop_timeout_s: float = 30.0


def _status_kib(pid: int, field: str) -> float | None:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM), None where there is no such file."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


class _RSSPeak:
    """The largest VmRSS seen while sampling, in MiB (None if never read)."""

    max_mib: float | None = None


@dataclass(frozen=True)
class LaunchedServer:
    url: str
    pid: int

    def rss_mib(self) -> float | None:
        kib = _status_kib(self.pid, "VmRSS")
        return None if kib is None else kib / 1024

    def hwm_mib(self) -> float | None:
        """Peak resident memory of the process's whole life (VmHWM), model loading included."""
        kib = _status_kib(self.pid, "VmHWM")
        return None if kib is None else kib / 1024

    @contextlib.contextmanager
    def sample_rss(self, every_s: float = 0.5) -> Iterator[_RSSPeak]:
        """Sample VmRSS in a thread while the block runs; the peak is in the yielded object."""
        peak, stop = _RSSPeak(), threading.Event()

        def sample() -> None:
            while True:
                rss = self.rss_mib()
                if rss is not None:
                    peak.max_mib = max(peak.max_mib or 0.0, rss)
                if stop.wait(every_s):
                    return

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield peak
        finally:
            stop.set()
            thread.join()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, num_lines: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-num_lines:])


def _wait_healthy(url: str, proc: subprocess.Popen, launch: LaunchConfig) -> None:
    """Return once GET /health answers 200; ServerUnreachableError if the process dies or time runs out."""
    import httpx

    deadline = time.monotonic() + launch.startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerUnreachableError(
                f"kvengine serve exited with code {proc.returncode} before it was ready; "
                f"last lines of {launch.log_path}: {_tail(launch.log_path)}"
            )
        try:
            if httpx.get(url + "/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)  # a poll interval, not a timing assumption: the deadline bounds the wait
    raise ServerUnreachableError(
        f"kvengine serve did not answer /health within {launch.startup_timeout_s:.0f} s; see {launch.log_path}"
    )


def _stop(proc: subprocess.Popen, timeout_s: float) -> None:
    """Ctrl-C (graceful shutdown), then SIGTERM, then SIGKILL, each given `timeout_s` at most."""
    for send in (lambda: proc.send_signal(signal.SIGINT), proc.terminate, proc.kill):
        if proc.poll() is not None:
            return
        send()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)


@contextlib.contextmanager
def launched_server(launch: LaunchConfig) -> Iterator[LaunchedServer]:
    """`kvengine serve` on a free 127.0.0.1 port for the duration of the block, output to the log."""
    port = _free_port()
    cmd = [sys.executable, "-m", "kvengine.cli", "serve", "--model", launch.model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *launch.serve_args]
    launch.log_path.parent.mkdir(parents=True, exist_ok=True)
    with launch.log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, proc, launch)
            yield LaunchedServer(url, proc.pid)
        finally:
            _stop(proc, launch.stop_timeout_s)


def parse_prometheus(text: str) -> dict[str, float]:
    """Metric name -> value, summed over label sets; comments and malformed lines are skipped."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line[: line.index("{")], line[line.rindex("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        try:
            values[name] = values.get(name, 0.0) + float(rest.split()[0])
        except (ValueError, IndexError):
            continue
    return values


def scrape_metrics(url: str, api_key: str | None = None) -> dict[str, float] | None:
    """The server's /metrics, parsed; None when it has none (404) or cannot be read."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url + "/metrics", headers=headers, timeout=10.0, trust_env=False)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_prometheus(response.text)


def metric(metrics: dict[str, float] | None, suffix: str) -> float | None:
    """The first metric whose name ends in `suffix` (any prefix, e.g. `kvengine_`), else None."""
    return next((v for k, v in (metrics or {}).items() if k.endswith(suffix)), None)


def blocks_in_use(metrics: dict[str, float] | None) -> float | None:
    """Pool blocks referenced by requests: used minus those only the prefix cache holds.

    None unless the page has a `*pool_blocks_used` gauge.
    """
    used = metric(metrics, "pool_blocks_used")
    return None if used is None else used - (metric(metrics, "pool_blocks_cached") or 0.0)


def settled_blocks_in_use(
    url: str, api_key: str | None, expected: float | None, timeout_s: float = 10.0
) -> float | None:
    """`blocks_in_use` after a run, polled until it equals `expected` or `timeout_s` passes.

    The last streams may be released a step after their clients saw [DONE];
    a count still above `expected` at the deadline is a leak, and is returned as is.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = blocks_in_use(scrape_metrics(url, api_key))
        if value is None or value == expected or time.monotonic() >= deadline:
            return value
        time.sleep(0.2)
