"""Runs llama.cpp for `kvengine bench decode|throughput --baseline llamacpp`: the worker side.

Runs under the python of the llama.cpp venv (recipe: tools/llamacpp_reference/README.md
in the source tree), started by `kvengine/bench/llamacpp.py`; imports only llama_cpp
(llama-cpp-python's ctypes bindings), numpy (which llama-cpp-python requires) and the
standard library, never kvengine. It measures; the caller alternates it with kvengine
and writes the rows.

The model is the GGUF file kvengine itself dequantizes, re-exported once by
llama.cpp's own `llama_model_quantize` (requantizing allowed) at the asked
precision, so both systems run the same dequantized weights. The KV cache is
kept at that precision too (llama.cpp's default would be F16), and flash
attention is off (kvengine's fp32 path computes attention in fp32).

Protocol, JSON lines on stdin/stdout (no pickle):
- argv: SOURCE_GGUF CACHE_DIR PRECISION THREADS, PRECISION one of `PRECISIONS`.
  The converted file is `CACHE_DIR/<source stem>.<precision>.gguf`, written once.
- First line out: `{"ready": true, "model_path", "precision", "versions": {...},
  "system_info"}`, or `{"error": "..."}` and exit status 3 when llama_cpp does not
  import or the model cannot be converted or loaded.
- Each line in is a request with an `id` and an `op`:
  - `{"op": "decode", "prompt_ids", "new_tokens"}`: one sequence, greedy, exactly
    `new_tokens` tokens (EOS ignored). Answer `{"id", "prefill_s",
    "decode_tokens_per_s", "output_ids"}`: prefill is from the start to the first
    token; decode speed is tokens after the first over the time after the first.
  - `{"op": "throughput", "prompts", "new_tokens"}`: all prompts as parallel
    sequences of one context, each with its own KV stream (prompts packed into
    one batch, then one batched decode step per token, like llama.cpp's
    `batched` example). Answer `{"id",
    "seconds", "output_ids", "mode": "batched"}`.
  A request that fails is answered `{"id", "error"}`; the worker goes on.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from typing import Any

# llama.cpp file type (for the export) and ggml tensor type (for the KV cache) of each precision.
# LLAMA_FTYPE_ALL_F32 / MOSTLY_BF16 / MOSTLY_Q8_0 / MOSTLY_Q4_1, GGML_TYPE_F32 / BF16 (the
# quantized ones keep an F32 KV cache)
PRECISIONS = {"f32": (0, 0), "bf16": (32, 30), "q8_0": (7, 0), "q4_1": (3, 0)}
MAX_UBATCH = 512  # llama.cpp's default physical batch


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def convert(llama_cpp: Any, source: str, cache_dir: str, precision: str, threads: int) -> str:
    """The path of `source` re-exported at `precision` under `cache_dir`, exporting it first if needed."""
    stem = os.path.splitext(os.path.basename(source))[0]
    out = os.path.join(cache_dir, f"{stem}.{precision}.gguf")
    if os.path.isfile(out):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = PRECISIONS[precision][0]
    params.allow_requantize = True  # the source is Q4_1: dequantize it, then store at `precision`
    params.nthread = threads
    tmp = f"{out}.{os.getpid()}.tmp"  # renamed into place only when complete
    if llama_cpp.llama_model_quantize(source.encode(), tmp.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize could not export {source} at {precision}")
    os.replace(tmp, out)
    return out


class Runner:
    """One loaded llama.cpp model; each request gets a fresh context sized to it."""

    def __init__(self, llama_cpp: Any, model_path: str, precision: str, threads: int) -> None:
        self.lib, self.threads, self.kv_type = llama_cpp, threads, PRECISIONS[precision][1]
        params = llama_cpp.llama_model_default_params()
        params.use_mmap = False  # weights in memory before the first timing, as kvengine's are
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def context(self, seq_len: int, n_seq: int, n_batch: int) -> Any:
        """A context of `n_seq` sequences of up to `seq_len` tokens, each its own KV stream."""
        p = self.lib.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_seq * seq_len, n_batch, min(n_batch, MAX_UBATCH)
        # Not unified: each sequence attends over its own cells only, not over all sequences' (masked).
        p.n_seq_max, p.kv_unified = n_seq, False
        p.n_threads = p.n_threads_batch = self.threads
        p.type_k = p.type_v = self.kv_type
        p.flash_attn_type = self.lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.no_perf = True
        ctx = self.lib.llama_init_from_model(self.model, p)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {n_seq} x {seq_len} tokens")
        return ctx

    def step(self, ctx: Any, batch: Any, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """Decode `items` (token, position, sequence, wants logits); the greedy token of each that wants."""
        batch.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        status = self.lib.llama_decode(ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        return [self.argmax(ctx, i) for i, item in enumerate(items) if item[3]]

    def argmax(self, ctx: Any, index: int) -> int:
        """The first index of the largest logit of batch row `index` (as torch.argmax breaks ties)."""
        import numpy as np

        row = self.lib.llama_get_logits_ith(ctx, index)
        return int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[float]]:
        """Greedy tokens of every prompt as parallel sequences; times at the start and after each step."""
        n_batch = max(sum(len(p) for p in prompts), len(prompts))  # the whole prefill in one call
        ctx = self.context(max(len(p) for p in prompts) + new_tokens, len(prompts), n_batch)
        batch = self.lib.llama_batch_init(n_batch, 0, 1)
        try:
            prefill = [
                (t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)
            ]
            times = [time.perf_counter()]
            outputs = [[t] for t in self.step(ctx, batch, prefill)]
            times.append(time.perf_counter())
            for k in range(new_tokens - 1):
                step = [
                    (out[-1], len(p) + k, s, True)
                    for s, (p, out) in enumerate(zip(prompts, outputs, strict=True))
                ]
                for out, token in zip(outputs, self.step(ctx, batch, step), strict=True):
                    out.append(token)
                times.append(time.perf_counter())
        finally:
            self.lib.llama_batch_free(batch)
            self.lib.llama_free(ctx)
        return outputs, times


def answer(runner: Runner, request: dict[str, Any]) -> dict[str, Any]:
    """The reply to one request (see the module docstring)."""
    new_tokens = int(request["new_tokens"])
    if request["op"] == "decode":
        (output,), times = runner.generate([request["prompt_ids"]], new_tokens)
        decode_s = times[-1] - times[1]
        return {
            "id": request["id"],
            "prefill_s": times[1] - times[0],
            "decode_tokens_per_s": (new_tokens - 1) / decode_s if decode_s > 0 else 0.0,
            "output_ids": output,
        }
    if request["op"] == "throughput":
        outputs, times = runner.generate(request["prompts"], new_tokens)
        return {
            "id": request["id"],
            "seconds": times[-1] - times[0],
            "output_ids": outputs,
            "mode": "batched",
        }
    raise ValueError(f"unknown op {request['op']!r}; known: decode, throughput")


def serve(runner: Runner) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            emit(answer(runner, request))
        except Exception as exc:  # reported per request: the caller decides whether to go on
            emit({"id": request.get("id"), "error": f"{type(exc).__name__}: {exc}"})


def start(source: str, cache_dir: str, precision: str, threads: int) -> tuple[Runner, dict[str, Any]]:
    """Import llama_cpp, export and load the model; the runner and the ready line."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    from importlib.metadata import version

    import llama_cpp

    llama_cpp.llama_backend_init()
    model_path = convert(llama_cpp, source, cache_dir, precision, threads)
    runner = Runner(llama_cpp, model_path, precision, threads)
    runner.generate([[1, 2, 3, 4, 5, 6, 7, 8]], 4)  # one-off costs of the first call, outside any timing
    versions = {"llama-cpp-python": version("llama-cpp-python")}
    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    ready = {"ready": True, "model_path": model_path, "precision": precision}
    return runner, {**ready, "versions": versions, "system_info": info}


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        emit({"error": "usage: llamacpp_worker.py SOURCE_GGUF CACHE_DIR PRECISION THREADS"})
        return 2
    try:
        runner, ready = start(argv[0], argv[1], argv[2], int(argv[3]))
    except Exception as exc:
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 3
    emit(ready)
    serve(runner)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
