import time, torch, sys
from torch.profiler import profile, ProfilerActivity
from kvengine.bench.throughput import document_ids
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.models import load
torch.set_num_threads(2)
model = load("smollm2-135m", dtype="float32")
doc = document_ids(model, 4096)
n = int(sys.argv[1])
engine = Engine(model, CacheConfig(max_kv_bytes=2 * 2**30), SchedulerConfig(max_num_seqs=n, max_step_tokens=8192))
ids = [engine.add_request(doc[i * 37 : i * 37 + 512], SamplingParams(max_tokens=200, ignore_eos=True)) for i in range(n)]
while min(len(engine.sequences[i].output_ids) for i in ids) < 2:
    engine.step()
for _ in range(2): engine.step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    t = time.perf_counter()
    for _ in range(3): engine.step()
    print("step ms", (time.perf_counter() - t) / 3 * 1000)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
