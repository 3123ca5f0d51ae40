"""A decode step profiled: fused op time vs the whole engine step, batch N, 512-token contexts."""
import cProfile, io, pstats, sys, time, torch
from kvengine.bench.throughput import document_ids
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.models import load
torch.set_num_threads(2)
model = load("smollm2-135m", dtype="float32")
doc = document_ids(model, 4096)
for n in [int(x) for x in sys.argv[1].split(",")]:
    engine = Engine(model, CacheConfig(max_kv_bytes=2 * 2**30), SchedulerConfig(max_num_seqs=n, max_step_tokens=8192))
    ids = [engine.add_request(doc[i * 37 : i * 37 + 512], SamplingParams(max_tokens=200, ignore_eos=True)) for i in range(n)]
    while min(len(engine.sequences[i].output_ids) for i in ids) < 2:
        engine.step()
    fused = engine.runner._fused
    tot = [0.0]
    inner = fused.op
    def timed(*a):
        t = time.perf_counter(); r = inner(*a); tot[0] += time.perf_counter() - t; return r
    fused.op = timed
    for _ in range(3): engine.step()
    tot[0] = 0.0
    steps = 20
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    for _ in range(steps): engine.step()
    pr.disable()
    el = (time.perf_counter() - t) / steps
    print(f"batch {n}: engine step {el*1000:.1f} ms, fused op {tot[0]/steps*1000:.1f} ms ({tot[0]/steps/el:.0%}), outside the op {(el - tot[0]/steps)*1000:.1f} ms")
    st = pstats.Stats(pr)
    py_self = sum(v[2] for k, v in st.stats.items() if k[0] != "~") / steps  # tottime of Python functions
    print(f"  Python functions' self time {py_self*1000:.2f} ms per step ({py_self/el:.1%} of the step)")
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(10); print(s.getvalue()[-2200:])

# The floor: every linear layer of a step (lm_head included) through the kernel alone, batch 1.
from kvengine.engine.linear import small_linear_op
op = small_linear_op()
mods = [m for m in model.hf_model.modules() if isinstance(m, torch.nn.Linear)]
xs = {m.in_features: torch.randn(1, m.in_features) for m in mods}
nbytes = sum(m.weight.numel() * m.weight.element_size() for m in mods)
times = []
for _ in range(10):
    t = time.perf_counter()
    for m in mods:
        op(xs[m.in_features], m.weight, m.bias)
    times.append(time.perf_counter() - t)
times.sort()
med = times[len(times) // 2]
print(f"linear layers alone, batch 1: {med*1000:.1f} ms per step for {nbytes/1e6:.0f} MB ({nbytes/med/1e9:.1f} GB/s), {len(mods)} calls")
