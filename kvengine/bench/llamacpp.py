"""`--baseline llamacpp` of `kvengine bench decode|throughput`: llama.cpp, in its own venv.

llama.cpp runs through llama-cpp-python, built from source in a venv of its own
(`.venv-llamacpp`, made by `tools/llamacpp_reference/setup.sh`; recipe in the README
next to it), so kvengine's venv needs no compiler and no llama.cpp. A worker,
`llamacpp_worker.py` (shipped next to this module), runs under that venv's python;
this module starts it, speaks its JSON-lines protocol (see the worker's docstring)
and hands it kvengine's own token ids, so both systems see the same tokens.

Both systems run the same weights: the bundled GGUF that kvengine dequantizes,
re-exported by llama.cpp at the precision asked for (f32 or bf16), with the KV
cache at that precision too. This module measures nothing itself and writes no
rows: `kvengine.bench.decode` and `kvengine.bench.throughput` alternate the
worker's runs with kvengine's and write them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvengine.config import default_cache_dir
from kvengine.errors import InvalidRequestError
from kvengine.models import registry
from kvengine.worker import JsonLinesWorker

WORKER = Path(__file__).resolve().parent / "llamacpp_worker.py"  # run by the llama.cpp venv
RECIPE = "see tools/llamacpp_reference/README.md (bash tools/llamacpp_reference/setup.sh builds the venv)"
VENV_PYTHON = Path(".venv-llamacpp") / "bin" / "python"
# Each precision of the baseline and the dtype kvengine loads the model in to match it; q8_0 and
# q4_1 are matched by kvengine's weight-only int8 / int4 (groups of 32, the same layouts) over float32.
PRECISIONS = {"f32": torch.float32, "bf16": torch.bfloat16, "q8_0": torch.float32, "q4_1": torch.float32}
WEIGHTS = {"q8_0": "int8", "q4_1": "int4"}


def default_python() -> Path:
    """`.venv-llamacpp/bin/python` under the working directory, else under kvengine's source checkout.

    The first of the two when neither exists, so that the error names where it was looked for.
    """
    candidates = [Path.cwd() / VENV_PYTHON, Path(__file__).resolve().parents[2] / VENV_PYTHON]
    return next((p for p in candidates if p.is_file()), candidates[0])


@dataclass(frozen=True)
class LlamaCppBaseline:
    """Where llama.cpp's python is, and how the baseline runs: precision and threads."""

    python: Path
    precision: str = "f32"
    threads: int = 0  # 0: torch's thread count, the same as kvengine's

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidRequestError(
                f"unknown llama.cpp precision {self.precision!r}; known: {', '.join(PRECISIONS)}"
            )
        if self.threads < 0:
            raise InvalidRequestError(f"llama.cpp threads must be >= 0, got {self.threads}")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype kvengine (and transformers) load the model in, to match llama.cpp's precision."""
        return PRECISIONS[self.precision]

    @property
    def weights(self) -> str:
        """How kvengine holds the linear weights to match: "int8" for q8_0, "int4" for q4_1, else "model"."""
        return WEIGHTS.get(self.precision, "model")

    @property
    def num_threads(self) -> int:
        return self.threads or torch.get_num_threads()


def source_gguf(model_name: str) -> Path:
    """The GGUF file of bundled model `model_name`, the one both systems start from."""
    bundled = registry.get_bundled(model_name)
    if bundled is None:
        raise InvalidRequestError(
            f"the llama.cpp baseline needs a bundled GGUF model ({', '.join(registry.bundled_names())}); "
            f"{model_name!r} is not one"
        )
    return registry.locate_gguf(bundled)


class LlamaCppWorker:
    """The llama.cpp worker process: started on entry, answers `decode()` and `throughput()`, stopped on exit.

    Raises InvalidRequestError naming the README recipe when the python is missing
    or llama_cpp does not import there, and with the worker's message when a
    request fails.
    """

    def __init__(self, baseline: LlamaCppBaseline, model_name: str, cache_dir: Path | None = None) -> None:
        self.baseline, self.model_name = baseline, model_name
        self.cache_dir = cache_dir or default_cache_dir() / "llamacpp"
        self.ready: dict[str, Any] = {}
        self._worker: JsonLinesWorker | None = None

    @property
    def versions(self) -> dict[str, str]:
        return dict(self.ready.get("versions", {}))

    def __enter__(self) -> LlamaCppWorker:
        python = self.baseline.python
        if not python.is_file():
            raise InvalidRequestError(f"llama.cpp python {python} does not exist; {RECIPE}")
        source = source_gguf(self.model_name)
        argv = [str(source), str(self.cache_dir), self.baseline.precision, str(self.baseline.num_threads)]
        self._worker = JsonLinesWorker("llama.cpp", python, WORKER, argv, RECIPE)
        self.ready = self._worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def decode(self, prompt_ids: list[int], new_tokens: int) -> dict[str, Any]:
        """One greedy request of exactly `new_tokens` tokens: `prefill_s`, `decode_tokens_per_s`, `output_ids`."""
        return self._request({"op": "decode", "prompt_ids": prompt_ids, "new_tokens": new_tokens})

    def throughput(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        """All `prompts` as parallel sequences: `seconds`, `output_ids` (one list per prompt), `mode`."""
        return self._request({"op": "throughput", "prompts": prompts, "new_tokens": new_tokens})

    def _request(self, payload: dict[str, Any]) -> dict[str, Any]:
        assert self._worker is not None, "use LlamaCppWorker as a context manager"
        reply = self._worker.reply(self._worker.send(payload))
        if "error" in reply:
            raise InvalidRequestError(f"llama.cpp failed on {payload['op']}: {reply['error']}")
        return reply
