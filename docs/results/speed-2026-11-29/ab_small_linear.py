"""docs/results/speed-2026-11-29: A/B of the small-batch linear kernel off / on / int8 weights, batch 1 and 16 concurrent, bundled model fp32."""
import copy, json, statistics, sys, time, torch
from kvengine.bench.decode import time_kvengine, time_transformers
from kvengine.bench.throughput import document_ids, engine_batch, hf_batch_generate
from kvengine.engine import linear, weights
from kvengine.models import load
torch.set_num_threads(2)
what = sys.argv[1]
model = load("smollm2-135m", dtype="float32")
q8 = copy.deepcopy(model); weights.quantize_weights(q8.hf_model, 8)
q4 = copy.deepcopy(model); weights.quantize_weights(q4.hf_model, 4)
doc = document_ids(model, 4096)
res = {}
def put(k, v): res.setdefault(k, []).append(v)
if what == "b1":
    ids = doc[:512]
    toks = {}
    for rep in range(3):
        for mode in ("off", "on8", "int8", "int4", "hf"):
            linear.MAX_ROWS = 0 if mode == "off" else 8
            m = {"int8": q8, "int4": q4}.get(mode, model)
            f = time_transformers if mode == "hf" else time_kvengine
            pre, dec, t = f(m, ids, 64)
            put(mode, (pre, dec)); toks[mode] = t
    for m, r in res.items():
        print(m, "prefill s", round(statistics.median(x[0] for x in r), 3), "decode tok/s", round(statistics.median(x[1] for x in r), 2))
    print("fp32 tokens equal off/on/hf:", toks["off"] == toks["on8"] == toks["hf"], "int8 / int4 same as fp32 for", sum(a == b for a, b in zip(toks["int8"], toks["on8"])), sum(a == b for a, b in zip(toks["int4"], toks["on8"])), "of 64")
else:
    prompts = [doc[i * 37: i * 37 + 512] for i in range(16)]
    outs = {}
    for rep in range(2):
        for mode in ("off", "on8", "on16", "hfbatch"):
            linear.MAX_ROWS = {"off": 0, "on8": 8, "on16": 16}.get(mode, 8)
            if mode == "hfbatch":
                o, s = hf_batch_generate(model, prompts, 64)
            else:
                o, s = engine_batch(model, prompts, 64)
            put(mode, 16 * 64 / s); outs[mode] = o
    for m, r in res.items():
        print(m, "output tok/s", round(statistics.median(r), 2), r)
    print("equal:", {m: outs[m] == outs["hfbatch"] for m in outs})
