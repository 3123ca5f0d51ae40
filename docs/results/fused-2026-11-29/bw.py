import time, torch
torch.set_num_threads(2)
x = torch.randn(128 * 2**20)  # 512 MiB
for name, f in (("sum", lambda: x.sum()), ("dot", lambda: torch.dot(x, x))):
    ts = []
    for _ in range(7):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort(); print(name, f"{x.numel()*4/ts[3]/1e9:.1f} GB/s")
