"""16 prompts of 512 tokens in flight, 64 new tokens each: engine fused / eager vs transformers' padded batched generate.

Also each system with 1 new token (the prefill alone), so the run splits into prefill and decode time.
"""
import statistics, sys, torch
from kvengine.bench.throughput import document_ids, engine_batch, hf_batch_generate
from kvengine.engine import runner
from kvengine.models import load
torch.set_num_threads(2)
model = load("smollm2-135m", dtype="float32")
doc = document_ids(model, 4096)
prompts = [doc[i * 37 : i * 37 + 512] for i in range(16)]
orig = runner.fused_decode_for
res, outs = {}, {}
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1):
    for mode in ("fused", "eager", "hfbatch", "fused-prefill", "hfbatch-prefill"):
        runner.fused_decode_for = orig if mode != "eager" else (lambda *a, **k: None)
        n = 1 if mode.endswith("prefill") else 64
        o, s = hf_batch_generate(model, prompts, n) if mode.startswith("hf") else engine_batch(model, prompts, n)
        res.setdefault(mode, []).append(s); outs[mode] = o
for m, r in res.items():
    s = statistics.median(r)
    print(f"{m}: {s:.2f} s" + ("" if m.endswith("prefill") else f", output tok/s (prefill included) {16 * 64 / s:.2f}"))
for m in ("fused", "hfbatch"):
    dec = statistics.median(res[m]) - statistics.median(res[m + "-prefill"])
    print(f"{m}: decode part {dec:.2f} s = {63 * 16 / dec:.1f} tok/s over 63 steps")
print("tokens equal to batched generate:", {m: outs[m] == outs["hfbatch"] for m in ("fused", "eager")})
