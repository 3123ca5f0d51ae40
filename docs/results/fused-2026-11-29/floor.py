import time, torch
from kvengine.engine.linear import small_linear_op
from kvengine.models import load
torch.set_num_threads(2)
model = load("smollm2-135m", dtype="float32")
op = small_linear_op()
mods = [m for m in model.hf_model.modules() if isinstance(m, torch.nn.Linear)]
xs = {m.in_features: torch.randn(1, m.in_features) for m in mods}
nbytes = sum(m.weight.numel() * 4 for m in mods)
times = []
for _ in range(15):
    t = time.perf_counter()
    for m in mods:
        op(xs[m.in_features], m.weight, m.bias)
    times.append(time.perf_counter() - t)
times.sort(); med = times[7]
hp = 0
for line in open("/proc/self/smaps_rollup"):
    if "AnonHugePages" in line: hp = line.split()[1]
print(f"{med*1000:.1f} ms, {nbytes/med/1e9:.1f} GB/s, AnonHugePages {hp} kB")
