"""A baseline's worker process: a script run by another venv's python, speaking JSON lines.

kvpress and llama.cpp cannot share kvengine's venv, so each baseline runs a
worker script under its own python (`python -P script ARGS`). The worker
writes one hello line (`{"ready": true, ...}`, or `{"error": ...}`), then
answers each request line with one or more lines carrying the request's
`id`. `JsonLinesWorker` starts it, checks the hello, sends requests and reads
answers; the worker's stderr goes to a temporary file, quoted when it stops.
The clients (`eval/kvpress_client.py`, `bench/llamacpp.py`) build the
requests and know what the answers mean.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

from kvengine.errors import InvalidRequestError


class JsonLinesWorker:
    """One worker process of baseline `label` (as errors name it): `start`, `send`, `reply`, `close`."""

    def __init__(self, label: str, python: Path, script: Path, argv: list[str], recipe: str) -> None:
        self.label, self.python, self.script, self.argv, self.recipe = label, python, script, argv, recipe
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None
        self._next_id = 0

    def start(self) -> dict[str, Any]:
        """Start the worker; returns its hello. Raises InvalidRequestError (worker stopped) unless ready."""
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._proc = subprocess.Popen(
            # -P: the script's folder (inside kvengine) must not shadow modules the baseline imports.
            [str(self.python), "-P", str(self.script), *self.argv],
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
                    f"{self.label} is not usable under {self.python}: {hello.get('error')}; {self.recipe}"
                )
        except BaseException:
            self.close()
            raise
        return hello

    def close(self) -> None:
        """Close the worker's stdin and wait for it (killed after 30 s); idempotent."""
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

    def send(self, payload: dict[str, Any]) -> int:
        """Write one request (`payload` plus a fresh `id`); returns the id its answers carry."""
        assert self._proc is not None and self._proc.stdin is not None, "start the worker first"
        request_id, self._next_id = self._next_id, self._next_id + 1
        self._proc.stdin.write(json.dumps({"id": request_id, **payload}) + "\n")
        self._proc.stdin.flush()
        return request_id

    def reply(self, request_id: int) -> dict[str, Any]:
        """The next answer line, which must belong to request `request_id`."""
        reply = self._read()
        if reply.get("id") != request_id:
            raise InvalidRequestError(
                f"the {self.label} worker answered request {reply.get('id')}, not {request_id}"
            )
        return reply

    def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise InvalidRequestError(
                f"the {self.label} worker under {self.python} stopped: {self._stderr_tail()}"
            )
        try:
            return dict(json.loads(line))
        except (json.JSONDecodeError, TypeError, ValueError):
            raise InvalidRequestError(
                f"the {self.label} worker wrote a line that is not JSON: {line[:200]!r}"
            ) from None

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()[-2000:].strip() or "(no message)"
