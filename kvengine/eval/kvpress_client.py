"""`kvengine eval --baseline kvpress`: the same examples answered by kvpress, in kvpress's own venv.

kvpress 0.5.5 pins `transformers<5.3` and kvengine needs a newer one, so the
two cannot share a process: a worker, `kvpress_worker.py` (shipped next to this module),
runs under the python of a kvpress venv that the caller names (`--kvpress-python`; there
is no default; recipe in `tools/kvpress_reference/README.md` of the source tree), loads
the same model directory, and answers each example through kvpress's pipeline. This
module starts it, speaks its JSON-lines protocol (see the worker's docstring) and builds
requests from kvengine's own tokenization and press hyperparameters, so both engines get
the same ids and the same press. It does not score, write or compare rows:
`kvengine.eval.runner` scores and writes them for both engines alike, and
`kvengine.eval.compare` puts them side by side.

Only presses kvpress also has run on both engines (`is_shared`); KIVI widths
and kvengine-only presses (h2o, scissorhands, per_layer) run on kvengine alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press import press_from_spec
from kvengine.worker import JsonLinesWorker

BASELINES = ("kvpress",)
WORKER = Path(__file__).resolve().parent / "kvpress_worker.py"  # run by the kvpress venv; imports no kvengine
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
        self._worker: JsonLinesWorker | None = None

    def __enter__(self) -> KvpressWorker:
        if not self.python.is_file():
            raise InvalidRequestError(f"kvpress python {self.python} does not exist; {RECIPE}")
        directory = model_dir(self.model)
        if not WORKER.is_file():
            raise InvalidRequestError(
                f"the kvpress worker script {WORKER} is missing (a broken kvengine install)"
            )
        self._worker = JsonLinesWorker(
            "kvpress", self.python, WORKER, [str(directory), str(self.threads)], RECIPE
        )
        self.versions = dict(self._worker.start().get("versions", {}))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

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
        assert self._worker is not None, "use KvpressWorker as a context manager"
        wire = []
        for spec, ratio in settings:
            kwargs, wrapper_kwargs = press_kwargs(spec, ratio)
            wire.append({"press": spec, "ratio": ratio, "kwargs": kwargs, "wrapper_kwargs": wrapper_kwargs})
        request = {"context_ids": context_ids, "question_ids": question_ids}
        request_id = self._worker.send({**request, "max_new_tokens": max_new_tokens, "settings": wire})
        while True:
            reply = self._worker.reply(request_id)
            if reply.get("done"):
                return
            yield reply
