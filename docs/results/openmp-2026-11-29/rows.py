import time, torch, statistics
from kvengine.engine.linear import small_linear_op; small_linear_op()
torch.set_num_threads(2)
shapes=[(576,576),(192,576),(192,576),(576,576),(1536,576),(1536,576),(576,1536)]
mats=[torch.randn(n,k) for _ in range(30) for (n,k) in shapes]
op=torch.ops.kvengine.small_linear
for M in (1,4,8,12,16,24,32,64):
    xs={576:torch.randn(M,576),1536:torch.randn(M,1536)}
    r={"small":[], "aten":[]}
    for rep in range(7):
        for name in ("small","aten"):
            t=time.perf_counter()
            for m in mats:
                (op(xs[m.shape[1]], m, None) if name=="small" else torch.nn.functional.linear(xs[m.shape[1]], m))
            r[name].append(time.perf_counter()-t)
    a,b=statistics.median(r["small"]),statistics.median(r["aten"])
    print(f"M={M:3d} small_linear {a*1e3:7.1f} ms  aten {b*1e3:7.1f} ms  aten/small {b/a:.2f}")
