"""Answers `kvengine eval` examples with kvpress's own pipeline: the worker behind `--baseline kvpress`.

Runs in the kvpress venv (recipe: tools/kvpress_reference/README.md in the source tree), started by
`kvengine/eval/kvpress_client.py`; imports only kvpress, transformers and
torch, never kvengine. It is not a benchmark on its own: it measures, the
caller scores and writes rows.

Protocol, JSON lines (no pickle):
- argv: MODEL_DIR TORCH_THREADS. The model directory is loaded with
  `AutoModelForCausalLM` in float32 with SDPA attention (kvpress's AdaKV
  refuses eager), on the CPU.
- First line out: `{"ready": true, "presses": [...], "versions": {...}}`, or
  `{"error": "..."}` and exit status 3 when something cannot load.
- Each line in: `{"id", "context_ids", "question_ids": [[...]], "max_new_tokens",
  "settings": [{"press", "ratio", "kwargs", "wrapper_kwargs"}]}`. The ids are
  kvengine's own tokenization, so both engines see the same tokens.
- Lines out per request: one line per setting as it finishes, a result
  `{"id", "press", "ratio", "outputs", "kv_bytes", "kv_bytes_full", "prefill_s",
  "answer_s"}` or `{"id", "press", "ratio", "error"}` when kvpress fails on it,
  then `{"id", "done": true}`.

Each setting goes through `KVPressTextGenerationPipeline.forward` (the
pipeline's own prefill under the press, then greedy answers with the cache
cut back after each question), given the ids instead of text. Timing: a
forward hook on the decoder stack marks the end of the first call (the
prefill, with the press's compression inside it): `prefill_s` is from the
start of `forward` to there, `answer_s` the rest. `kv_bytes` is the bytes of
the keys and values the cache holds after that prefill; AdaKV masks instead
of evicting, so its bytes are the full cache's, as kvpress holds them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

PRESS_CLASSES = {
    "knorm": "KnormPress",
    "keydiff": "KeyDiffPress",
    "snapkv": "SnapKVPress",
    "pyramidkv": "PyramidKVPress",
    "tova": "TOVAPress",
    "expected_attention": "ExpectedAttentionPress",
    "streaming_llm": "StreamingLLMPress",
    "random": "RandomPress",
}
WRAPPER_CLASSES = {"adakv": "AdaKVPress"}


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def make_press(
    kvpress: Any, spec: str, ratio: float, kwargs: dict[str, Any], wrapper_kwargs: dict[str, Any]
) -> Any:
    """The kvpress press for a kvengine spec ("snapkv", "adakv:snapkv"), None for "none"."""
    if spec == "none":
        return None
    *wrappers, name = spec.split(":")
    if name not in PRESS_CLASSES or any(w not in WRAPPER_CLASSES for w in wrappers) or len(wrappers) > 1:
        raise ValueError(f"no kvpress counterpart for press {spec!r}")
    cls = getattr(kvpress, PRESS_CLASSES[name])
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:  # a hyperparameter kvpress does not have: the two presses would differ
        raise ValueError(f"kvpress {cls.__name__} has no hyperparameter {', '.join(unknown)}")
    press = cls(compression_ratio=ratio, **kwargs)
    for wrapper in wrappers:
        press = getattr(kvpress, WRAPPER_CLASSES[wrapper])(press, **wrapper_kwargs)
    return press


def cache_bytes(cache: Any) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


class PrefillClock:
    """Marks when the first call of the decoder stack (the prefill) returns, and the cache's bytes then."""

    def __init__(self, decoder: Any, cache: Any) -> None:
        self.end: float | None = None
        self.kv_bytes = 0
        self.cache = cache
        self.handle = decoder.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:  # returns None: a forward hook's return value replaces the output
        if self.end is None:
            self.end = time.perf_counter()
            self.kv_bytes = cache_bytes(self.cache)


def run_setting(
    pipe: Any, torch: Any, request: dict[str, Any], setting: dict[str, Any], press: Any
) -> dict[str, Any]:
    from transformers import DynamicCache

    context = torch.tensor([request["context_ids"]])
    questions = [torch.tensor([q]) for q in request["question_ids"]]
    cache = DynamicCache()
    clock = PrefillClock(pipe.model.model, cache)
    try:
        start = time.perf_counter()
        outputs = pipe.forward(
            {"context_ids": context, "questions_ids": questions},
            press=press,
            max_new_tokens=request["max_new_tokens"],
            cache=cache,
        )
        end = time.perf_counter()
    finally:
        clock.handle.remove()
    assert clock.end is not None
    config = pipe.model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # float32
    return {
        "id": request["id"],
        "press": setting["press"],
        "ratio": setting["ratio"],
        "outputs": [str(o) for o in outputs],
        "kv_bytes": clock.kv_bytes,
        "kv_bytes_full": per_token * context.shape[1],
        "prefill_s": clock.end - start,
        "answer_s": end - clock.end,
    }


def serve(pipe: Any, torch: Any, kvpress: Any) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        for s in request["settings"]:
            try:
                press = make_press(
                    kvpress, s["press"], s["ratio"], s.get("kwargs", {}), s.get("wrapper_kwargs", {})
                )
                with torch.inference_mode():
                    emit(run_setting(pipe, torch, request, s, press))
            except Exception as exc:  # reported per setting: the caller keeps the others' results
                emit(
                    {
                        "id": request["id"],
                        "press": s["press"],
                        "ratio": s["ratio"],
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
        emit({"id": request["id"], "done": True})


def main(model_dir: str, threads: int) -> int:
    try:
        from importlib.metadata import version

        import kvpress
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        torch.set_num_threads(threads)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        )
        model.eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")  # type: ignore[call-overload]  # a task kvpress registers at import
    except Exception as exc:
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 3
    versions = {
        "kvpress": version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    presses = ["none", *PRESS_CLASSES, *(f"{w}:{p}" for w in WRAPPER_CLASSES for p in PRESS_CLASSES)]
    emit({"ready": True, "presses": presses, "versions": versions})
    serve(pipe, torch, kvpress)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: kvpress_worker.py MODEL_DIR TORCH_THREADS")
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
