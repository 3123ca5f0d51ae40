"""Batch-1 decode A/B in one process: the fused step vs the model's modules (eager), fp32 / int8 / int4 weights, transformers generate; 512-token prompt, 64 new tokens, systems alternating."""
import copy, statistics, sys, time, torch
from kvengine.bench.decode import time_kvengine, time_transformers
from kvengine.bench.throughput import document_ids
from kvengine.engine import runner, weights
from kvengine.models import load
torch.set_num_threads(2)
dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
model = load("smollm2-135m", dtype=dtype)
q8 = copy.deepcopy(model); weights.quantize_weights(q8.hf_model, 8)
q4 = copy.deepcopy(model); weights.quantize_weights(q4.hf_model, 4)
doc = document_ids(model, 4096)
orig = runner.fused_decode_for
res, toks = {}, {}
ids = doc[:512]
for rep in range(reps):
    for mode in ("eager", "fused", "int8-eager", "int8-fused", "int4-fused", "hf"):
        runner.fused_decode_for = orig if "fused" in mode else (lambda *a, **k: None)
        m = q8 if mode.startswith("int8") else q4 if mode.startswith("int4") else model
        f = time_transformers if mode == "hf" else time_kvengine
        pre, dec, t = f(m, ids, 64)
        res.setdefault(mode, []).append(dec); toks[mode] = t
for m, r in res.items():
    print(m, "decode tok/s", round(statistics.median(r), 2), [round(x, 1) for x in r])
print("tokens equal eager/fused/hf:", toks["eager"] == toks["fused"], toks["fused"] == toks["hf"], "int8 fused==eager", toks["int8-eager"] == toks["int8-fused"])
